"""pytest fixtures for nested-vSMMU scenarios; loaded by ``tests/conftest.py``.

* ``nested_machine`` — an async factory: ``nm = await nested_machine(NestedConfig(...))``
  starts the service, boots the guest and returns a started
  :class:`~qmp_harness.nested.NestedMachine` booting the guest kernel of
  ``config.guest_suite`` (the session's default when None).  All are closed
  after the test.
  When the test fails, each machine's failure report (guest console tail,
  service log tail, last QMP events of QEMU and of the service) is printed
  and attached to the test report as a section.  When it passed, each
  machine's sanitizer (``NestedConfig.sanitize``, on by default) must have
  reported no guest error it did not allow, or the test fails at teardown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Generator
from typing import Protocol

import pytest
from qemu.qmp import QMPError

from qmp_harness.fixtures import GuestEnvironment
from qmp_harness.nested import NestedBootError, NestedConfig, NestedMachine

REPORT_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Remember each phase's report on the item, so fixtures can see a failed test."""
    report = yield
    item.stash.setdefault(REPORT_KEY, {})[report.when] = report
    return report


def run_failed(item: pytest.Item) -> bool:
    """Whether the setup or the call phase of ``item`` failed."""
    reports = item.stash.get(REPORT_KEY, {})
    return any(r.failed for r in reports.values())


class StartNested(Protocol):
    """The ``nested_machine`` fixture's call signature."""

    async def __call__(self, config: NestedConfig | None = None) -> NestedMachine: ...


@pytest.fixture
async def nested_machine(
    guest_env: GuestEnvironment, request: pytest.FixtureRequest
) -> AsyncIterator[StartNested]:
    """Factory starting :class:`NestedMachine` s; reports on failure, closes all after."""
    machines: list[NestedMachine] = []

    async def start(config: NestedConfig | None = None) -> NestedMachine:
        guest = guest_env.guest_for(config.guest_suite if config is not None else None)
        machine = NestedMachine(guest_env.qemu, guest, config,
                                cache=guest_env.cache, name=f"nested{len(machines)}")
        machines.append(machine)
        await machine.start()
        return machine

    yield start
    unexpected: list[str] = []
    if not run_failed(request.node):
        for machine in machines:
            with contextlib.suppress(QMPError, OSError, EOFError, NestedBootError):
                unexpected += [f"{machine.name}: {error}"
                               for error in await machine.unexpected_guest_errors()]
    if run_failed(request.node):
        for machine in machines:
            report = machine.failure_report("the test failed")
            print(report)
            request.node.add_report_section("teardown", f"nested {machine.name}", report)
    for machine in reversed(machines):
        await machine.close()
    if unexpected:
        pytest.fail("the sanitizer reported guest errors (VSMMU_GUEST_ERROR):\n"
                    + "\n".join(unexpected), pytrace=False)
