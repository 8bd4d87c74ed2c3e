"""Boot the stock Debian guest under QEMU 11.1 and drive it over QMP and the console."""

from __future__ import annotations

import os

import pytest

from qmp_harness.fixtures import BootMachine, GuestEnvironment

pytestmark = pytest.mark.e2e

RESET_TIMEOUT = 120.0
QUIT_TIMEOUT = 15.0
UNMAPPED = -1  # query-pci's address of a BAR that is not mapped


async def test_guest_boots_and_runs_commands(
    boot_machine: BootMachine, guest_env: GuestEnvironment
) -> None:
    vm = await boot_machine()
    output, status = await vm.console.run("uname -r")
    assert status == 0
    assert output.strip() == guest_env.guest.release
    output, status = await vm.console.run("ls /no/such/path")
    assert status != 0 and "No such file" in output
    assert (await vm.execute("query-status"))["status"] == "running"
    assert "vsmmu guest: init started" in vm.console.transcript


async def test_system_reset_reboots_the_guest(boot_machine: BootMachine) -> None:
    vm = await boot_machine()
    await vm.console.run("echo before-reset > /tmp/marker")
    first_boot_events = len(vm.events)
    await vm.execute("system_reset")
    reset = await vm.wait_event("RESET", RESET_TIMEOUT, since=first_boot_events)
    assert reset["data"]["reason"] == "host-qmp-system-reset"
    await vm.wait_ready(RESET_TIMEOUT)
    # a fresh initramfs: the file written before the reset is gone
    output, status = await vm.console.run("cat /tmp/marker")
    assert status != 0, output
    assert (await vm.execute("query-status"))["status"] == "running"


async def test_quit_ends_qemu(boot_machine: BootMachine) -> None:
    vm = await boot_machine()
    workdir = vm.workdir
    pid = vm.pid
    assert pid is not None
    status = await vm.shutdown(timeout=QUIT_TIMEOUT)
    assert status == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not workdir.exists(), "sockets left behind"


async def test_paused_start_allows_query_pci_before_the_guest_runs(
    boot_machine: BootMachine,
) -> None:
    vm = await boot_machine(devices=['{"driver":"edu","addr":"0x1"}'], paused=True)
    assert (await vm.execute("query-status"))["status"] == "prelaunch"
    edu = [d for d in await vm.query_pci() if d["slot"] == 1]
    assert len(edu) == 1
    assert edu[0]["regions"][0]["address"] == UNMAPPED
    await vm.resume()
    await vm.wait_ready()
    # The guest kernel assigns BAR 0 but leaves memory decoding off, so QEMU
    # reports it unmapped until the function is enabled.
    still = next(d for d in await vm.query_pci() if d["slot"] == 1)
    assert still["regions"][0]["address"] == UNMAPPED
    output, status = await vm.console.run("echo 1 > /sys/bus/pci/devices/0000:00:01.0/enable")
    assert status == 0, output
    after = next(d for d in await vm.query_pci() if d["slot"] == 1)
    sysfs, _ = await vm.console.run("cat /sys/bus/pci/devices/0000:00:01.0/resource")
    assert after["regions"][0]["address"] == int(sysfs.split()[0], 16) != UNMAPPED
