"""virtio-rng endpoint alone under a real QEMU and Linux guest, WITHOUT any IOMMU.

The endpoint is served over vfio-user; its DMA port is the test-only
:class:`~vsmmu.endpoints.identity.IdentityDmaPort` (IOVA == GPA over the RAM
QEMU mapped into the endpoint's DMA table).  The stock Debian guest loads
``virtio_rng``, binds it to our function through the modern virtio-pci
transport with INTx, and reads ``/dev/hwrng``; the bytes must be the seeded
stream.

Where the guest's read starts in the stream is found by content (its first
bytes), because the kernel also consumes the device: ``add_early_randomness``
at registration and the ``hwrng`` fill kthread, which wakes every
``max(1 s, uptime / 2)`` early in boot and takes 64 bytes under the same
mutex as ``/dev/hwrng`` readers (``rng_core.default_quality=0`` does not stop
it on 6.12).  Seen here: about one such take per 256 KiB read.  So the guest
reports the SHA-256 of every 4 KiB block and
:func:`~qmp_harness.hwrng.match_stream_blocks` checks each block,
allowing a whole-chunk gap inside a block: every byte read is still checked.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest

from qmp_harness.fixtures import (  # noqa: F401 - pytest fixtures used by name
    BootMachine,
    boot_machine,
    guest_env,
    vsmmu_cache,
)
from qmp_harness.hwrng import locate_in_stream, match_stream_blocks
from qmp_harness.machine import Machine
from vsmmu.endpoints import virtio_uapi as vu
from vsmmu.endpoints.identity import IdentityDmaPort
from vsmmu.endpoints.virtio_rng import VirtioRng
from vsmmu.vfio_user import VfioUserServer
from vsmmu.vfio_user import uapi as pci

SLOT = 3
BDF = f"0000:00:{SLOT:02x}.0"
SEED = 0x5EED_0007
KIB = 1024
READ_KIB = 256
READ_BLOCK = 4 * KIB
#: Bytes of the guest's sample used to find where it starts in the stream.
PROBE_BYTES = 32
#: How far before the device's position at the start the guest's read may begin
#: (what the driver and hwrng core may hold already).
LOOKBEHIND = 64 * KIB
OD_BYTES_PER_LINE = 16
EXT_CAP_ID_MASK = (1 << pci.PCI_EXT_CAP_VER_SHIFT) - 1
#: Bytes the kernel's fill kthread may take during the read (it wakes every
#: max(1 s, uptime/2) and takes 64).
MAX_SKIPPED = 4 * 64
DRIVER_WAIT_S = 30


@pytest.fixture
def socket_path() -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="vrng-", dir="/tmp")
    path = os.path.join(directory, "rng.sock")
    yield path
    if os.path.exists(path):
        os.unlink(path)
    os.rmdir(directory)


@pytest.fixture
async def rng_server(socket_path: str) -> AsyncIterator[VirtioRng]:
    rng = VirtioRng("virtio-rng0", seed=SEED, ats=True)
    rng.bind_dma(IdentityDmaPort(rng.pci.dma))
    async with VfioUserServer(rng.pci, socket_path):
        yield rng


def vfio_user_device(path: str) -> str:
    """The ``-device`` JSON (QEMU rejects the dotted form for ``socket``)."""
    return json.dumps(
        {"driver": "vfio-user-pci", "socket": {"type": "unix", "path": path}, "addr": f"{SLOT:#x}"}
    )


async def sh(vm: Machine, command: str, timeout: float = 60.0) -> str:
    output, status = await vm.console.run(command, timeout=timeout)
    assert status == 0, f"{command!r} failed ({status}): {output}\n{vm.failure_report('')}"
    return output.strip()


@pytest.mark.e2e
async def test_guest_reads_seeded_stream_from_hwrng(
    boot_machine: BootMachine,  # noqa: F811
    rng_server: VirtioRng,
    socket_path: str,
) -> None:
    rng = rng_server
    vm = await boot_machine(
        devices=[vfio_user_device(socket_path)],
        modules=["virtio_rng"],
        )

    # The guest bound virtio_rng to our function through the modern transport.
    await sh(
        vm,
        f"i=0; until grep -q virtio_rng /sys/class/misc/hw_random/rng_current 2>/dev/null; "
        f"do i=$((i+1)); [ $i -gt {DRIVER_WAIT_S * 10} ] && exit 1; sleep 0.1; done",
        timeout=DRIVER_WAIT_S + 10,
    )
    driver = await sh(vm, f"basename $(readlink /sys/bus/pci/devices/{BDF}/driver)")
    assert driver == "virtio-pci"
    assert rng.feature_negotiated(vu.VirtioFeature.VERSION_1)
    assert rng.feature_negotiated(vu.VirtioFeature.ACCESS_PLATFORM)
    assert rng.pci.intx.eventfd is not None, "QEMU gave the INTx line no eventfd"

    # The ATS extended capability is what the guest sees at 0x100.
    header = await sh(
        vm, f"od -An -tx4 -j{pci.PCI_EXT_CAP_FIRST} -N4 /sys/bus/pci/devices/{BDF}/config"
    )
    assert int(header, 16) & EXT_CAP_ID_MASK == pci.PCI_EXT_CAP_ID_ATS, header

    length = READ_KIB * KIB
    blocks = length // READ_BLOCK
    before = rng.position
    out = await sh(
        vm,
        f"dd if=/dev/hwrng of=/tmp/rng bs={READ_BLOCK} count={blocks} 2>/dev/null && "
        f"wc -c < /tmp/rng && od -An -tx1 -v -N{PROBE_BYTES} /tmp/rng && "
        f"i=0; while [ $i -lt {blocks} ]; do "
        f"dd if=/tmp/rng bs={READ_BLOCK} skip=$i count=1 2>/dev/null | sha256sum; "
        f"i=$((i+1)); done",
    )
    lines = out.splitlines()
    assert int(lines[0]) == length, out
    probe_lines = -(-PROBE_BYTES // OD_BYTES_PER_LINE)
    probe = bytes.fromhex("".join(lines[1 : 1 + probe_lines]).replace(" ", ""))
    digests = [bytes.fromhex(line.split()[0]) for line in lines[1 + probe_lines :]]
    assert len(digests) == blocks, out
    start = locate_in_stream(SEED, probe, max(0, before - LOOKBEHIND), rng.position)
    assert start is not None, (
        f"the guest's first bytes {probe.hex()} are not in the stream before "
        f"position {rng.position}: not our device's data"
    )
    match = match_stream_blocks(SEED, start, digests, READ_BLOCK)
    assert match is not None, f"the guest's {READ_KIB} KiB from offset {start} are not the stream"
    # Only Linux's own hwrng consumers may take bytes in the middle, a chunk at a time.
    assert match.skipped <= MAX_SKIPPED, match.gaps
    assert match.block_offsets[-1] + READ_BLOCK <= rng.position

    # Data flowed by DMA through INTx-signalled requests, no faults.
    stats = rng.stats()
    assert stats["dma_faults"] == 0 and stats["needs_reset_reason"] is None, stats
    assert rng.position >= length and rng.requests_completed > 0
    assert rng.pci.intx.delivered > 0
    interrupts = await sh(vm, "cat /proc/interrupts")
    line = next(
        (row for row in interrupts.splitlines() if re.search(r"virtio\d", row)), None
    )
    assert line is not None, interrupts
    counts = [int(field) for field in line.split()[1:3] if field.isdigit()]
    assert sum(counts) > 0, line
    print(f"\nrng stats: {stats}\n/proc/interrupts: {line.strip()}\ngaps: {match.gaps}")
