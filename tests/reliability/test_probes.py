"""The wire fuzz (vfio-user, QMP) and the hostile-guest register fuzz against a live service.

The service is a ``vsmmu serve`` process; the probes run concurrently, then
the service must be alive, have answered every request in time, hold only its
own iommufd objects, have the descriptor count it had before and an RSS that
did not run away, and have logged no traceback.  The size is
``--reliability-examples`` / ``$VSMMU_RELIABILITY_EXAMPLES`` (conftest).
"""

from __future__ import annotations

from reliability.service import ServiceProcess, run_probes

#: RSS growth allowed over a probe run: allocator slack, not a leak per message.
RSS_SLACK_KIB = 16 * 1024
#: Log bytes per probe message: the rate limiter keeps a flood of refusals short.
LOG_BYTES_PER_MESSAGE = 12


async def test_probes_leave_the_service_whole(reliability_examples: int) -> None:
    examples = reliability_examples
    async with ServiceProcess() as service:
        report = await run_probes(service, vfio_messages=examples,
                                  qmp_messages=max(examples // 5, 100),
                                  register_writes=examples, seed=examples,
                                  rounds=max(1, examples // 2000))
        log_bytes = len(service.log_text().encode())
    print("\n".join(report.lines()))
    assert report.alive
    assert report.vfio.messages >= examples and report.registers.messages >= examples
    assert report.vfio.hung == report.qmp.hung == report.registers.hung == 0
    assert report.vfio.error_replies > 0 and report.qmp.error_replies > 0  # it was hostile
    assert report.objects_left == set()
    assert report.fds_after == report.fds_before
    assert report.rss_after_kib - report.rss_before_kib < RSS_SLACK_KIB
    assert report.tracebacks == 0
    total = report.vfio.messages + report.qmp.messages + report.registers.messages
    assert log_bytes < LOG_BYTES_PER_MESSAGE * total, f"{log_bytes} log bytes for {total}"
