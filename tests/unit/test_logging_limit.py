"""Log rate limiting per source (``vsmmu.logging_limit``)."""

from __future__ import annotations

import logging

from vsmmu.logging_limit import RateLimitFilter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object, level: int = logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_source_past_its_burst_is_dropped_then_counted() -> None:
    clock = Clock()
    limiter = RateLimitFilter(burst=5, window_s=10.0, clock=clock)
    passed = [limiter.filter(record("vsmmu.x", "refused %d", n)) for n in range(100)]
    assert passed == [True] * 5 + [False] * 95
    assert limiter.dropped_total == 95
    clock.now = 10.0
    late = record("vsmmu.x", "refused %d", 100)
    assert limiter.filter(late)
    assert late.getMessage() == "refused 100 [dropped 95 similar messages]"
    again = record("vsmmu.x", "refused %d", 101)
    assert limiter.filter(again) and again.getMessage() == "refused 101"


def test_sources_are_limited_independently() -> None:
    limiter = RateLimitFilter(burst=2, window_s=10.0, clock=Clock())
    for _ in range(10):
        limiter.filter(record("vsmmu.a", "flood"))
    assert limiter.filter(record("vsmmu.a", "other message"))
    assert limiter.filter(record("vsmmu.b", "flood"))


def test_trace_and_debug_are_never_limited() -> None:
    limiter = RateLimitFilter(burst=1, window_s=10.0, clock=Clock())
    assert all(limiter.filter(record("vsmmu.session.trace", "x", level=logging.INFO))
               for _ in range(50))
    assert all(limiter.filter(record("vsmmu.y", "x", level=logging.DEBUG)) for _ in range(50))
