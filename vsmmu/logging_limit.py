"""Log rate limiting per source: a guest or a client cannot flood the log.

Everything a guest or a client controls can make the service log (a broken
device's doorbell rung in a loop, a fuzzing client's refused messages), so
every log line goes through :class:`RateLimitFilter`.  A *source* is one call
site: the logger's name and the unformatted message.  Each source may log
:data:`BURST` records per :data:`WINDOW_S` seconds; past that its records are
dropped and counted, and the next record it is allowed to log carries
``[dropped N similar messages]``, as the kernel's printk rate limit reports
"callbacks suppressed".

Trace loggers (names ending in ``.trace``, enabled on purpose with
``--trace``) and DEBUG records are never limited: whoever turns them on wants
every line.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable

#: Records one source may log per window.
BURST = 20
#: The window, in seconds.
WINDOW_S = 10.0
#: Sources remembered at once; the least recently seen is forgotten past it.
MAX_SOURCES = 4096
_TRACE_SUFFIX = ".trace"


class _Source:
    __slots__ = ("dropped", "logged", "window_start")

    def __init__(self, now: float) -> None:
        self.window_start = now
        self.logged = 0
        self.dropped = 0


class RateLimitFilter(logging.Filter):
    """Drops a source's records past ``burst`` per ``window_s``; reports the count later."""

    def __init__(self, burst: int = BURST, window_s: float = WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._sources: collections.OrderedDict[tuple[str, object], _Source] = (
            collections.OrderedDict())
        #: Records dropped so far, all sources together.
        self.dropped_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """True to log ``record`` (possibly with a dropped-count suffix), False to drop it."""
        if record.levelno <= logging.DEBUG or record.name.endswith(_TRACE_SUFFIX):
            return True
        key = (record.name, record.msg)
        now = self._clock()
        source = self._sources.get(key)
        if source is None:
            source = self._sources[key] = _Source(now)
            if len(self._sources) > MAX_SOURCES:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(key)
            if now - source.window_start >= self.window_s:
                source.window_start = now
                source.logged = 0
        if source.logged >= self.burst:
            source.dropped += 1
            self.dropped_total += 1
            return False
        source.logged += 1
        if source.dropped:
            record.msg = f"{record.getMessage()} [dropped {source.dropped} similar messages]"
            record.args = None
            source.dropped = 0
        return True


def limit_log_rate(logger: logging.Logger | None = None) -> RateLimitFilter:
    """Put one :class:`RateLimitFilter` on every handler of ``logger`` (the root by default)."""
    limiter = RateLimitFilter()
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(limiter)
    return limiter


__all__ = ["BURST", "WINDOW_S", "RateLimitFilter", "limit_log_rate"]
