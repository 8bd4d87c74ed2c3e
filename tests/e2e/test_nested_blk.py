"""A stock Linux guest uses a virtio-blk disk behind the nested vSMMU (``iommu.strict=1``).

The guest loads Debian's ``virtio_blk`` module, finds the disk in a DMA
(translated) IOMMU group and writes a random pattern with ``O_DIRECT``; the
host then reads the image file itself (no vsmmu code) and finds the guest's
bytes there.  After a ``system_reset`` the rebooted guest reads the pattern
back, and also reads a region the host wrote into the image before the boot.
Every byte moved between the image and guest RAM through views the vSMMU
translated from the guest's own page tables.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from qmp_harness.nested import BLK_MODULES, VIRTIO_BLK, NestedConfig, NestedEndpoint, NestedMachine
from qmp_harness.nested_fixtures import StartNested

pytestmark = pytest.mark.e2e

MIB = 1024 * 1024
IMAGE_SIZE = 16 * MIB
PATTERN_OFFSET = 3 * MIB
PATTERN_SIZE = MIB
HOST_OFFSET = 8 * MIB
HOST_SIZE = 256 * 1024
BLOCK = 64 * 1024
RESET_SETTLE_S = 10.0
SERIAL = "vsmmu-blk2"


def host_pattern() -> bytes:
    """Bytes the host writes into the image before the guest boots."""
    blocks = range(HOST_SIZE // 32)
    return b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest() for i in blocks)


async def guest_sha256(nm: NestedMachine, device: str, offset: int, size: int) -> str:
    """SHA-256 of ``size`` bytes at ``offset`` of the guest's disk, read with O_DIRECT."""
    out = await nm.sh(f"dd if={device} bs={BLOCK} skip={offset // BLOCK} count={size // BLOCK} "
                      f"iflag=direct 2>/dev/null | sha256sum", timeout=120)
    return out.split()[0]


async def test_guest_writes_reboots_and_reads_back_through_the_vsmmu(
    nested_machine: StartNested, tmp_path: Path,
) -> None:
    image = tmp_path / "disk.raw"
    with image.open("wb") as f:
        f.truncate(IMAGE_SIZE)
        f.seek(HOST_OFFSET)
        f.write(host_pattern())
    endpoint = NestedEndpoint(slot=2, kind=VIRTIO_BLK, image=image)
    nm = await nested_machine(NestedConfig(endpoints=(endpoint,), modules=BLK_MODULES,
                                           append=("iommu.strict=1",)))
    await nm.wait_endpoint_bound(endpoint)
    assert "strict mode" in await nm.dmesg("DMA domain TLB invalidation policy")
    group = await nm.iommu_group(endpoint)
    assert group is not None
    assert await nm.sh(f"cat /sys/kernel/iommu_groups/{group}/type") == "DMA"
    device = await nm.block_device(endpoint)
    name = device.removeprefix("/dev/")
    assert int(await nm.sh(f"cat /sys/block/{name}/size")) == IMAGE_SIZE // 512
    assert await nm.sh(f"cat /sys/block/{name}/serial") == SERIAL  # GET_ID
    assert await nm.sh(f"cat /sys/block/{name}/ro") == "0"

    # The guest writes a random pattern with O_DIRECT and flushes.
    started = time.monotonic()
    written = await nm.sh(
        f"dd if=/dev/urandom of=/tmp/pattern bs={BLOCK} count={PATTERN_SIZE // BLOCK} "
        f"2>/dev/null && dd if=/tmp/pattern of={device} bs={BLOCK} seek={PATTERN_OFFSET // BLOCK} "
        f"oflag=direct conv=fsync 2>/dev/null && sha256sum /tmp/pattern", timeout=120)
    print(f"\n1 MiB written through the nested vSMMU in {time.monotonic() - started:.1f}s")
    pattern_sha = written.split()[0]
    on_host = image.read_bytes()
    assert hashlib.sha256(on_host[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_SIZE]).hexdigest() \
        == pattern_sha
    untouched = bytearray(IMAGE_SIZE)
    untouched[HOST_OFFSET : HOST_OFFSET + HOST_SIZE] = host_pattern()
    untouched[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_SIZE] = \
        on_host[PATTERN_OFFSET : PATTERN_OFFSET + PATTERN_SIZE]
    assert on_host == untouched, "the guest's write landed outside its range"

    # Reboot: the guest, the vSMMU state and the endpoint all start again.
    await nm.vm.execute("stop")
    await nm.vm.execute("system_reset")
    deadline = time.monotonic() + RESET_SETTLE_S
    while (await nm.service("query-vsmmu"))["guest-objects"]:
        assert time.monotonic() < deadline, "the service kept guest objects after system_reset"
    await nm.vm.execute("cont")
    await nm.verify_smmu_bar()
    await nm.vm.wait_ready()
    await nm.wait_endpoint_bound(endpoint)
    device = await nm.block_device(endpoint)

    assert await guest_sha256(nm, device, PATTERN_OFFSET, PATTERN_SIZE) == pattern_sha
    assert await guest_sha256(nm, device, HOST_OFFSET, HOST_SIZE) \
        == hashlib.sha256(host_pattern()).hexdigest()
    assert not [e for e in nm.service_events if e["event"] in ("VSMMU_EVENT", "VSMMU_CERROR")], \
        nm.service_events
    row = (await nm.service("query-vsmmu-streams", {"sid": endpoint.sid}))[0]
    assert row["endpoint"] == endpoint.name and "nested HWPT" in str(row["attached-to"]), row


async def test_readonly_disk_refuses_writes(nested_machine: StartNested, tmp_path: Path) -> None:
    image = tmp_path / "ro.raw"
    image.write_bytes(host_pattern() * 4)
    endpoint = NestedEndpoint(slot=2, kind=VIRTIO_BLK, image=image, readonly=True)
    nm = await nested_machine(NestedConfig(endpoints=(endpoint,), modules=BLK_MODULES,
                                           append=("iommu.strict=1",)))
    await nm.wait_endpoint_bound(endpoint)
    device = await nm.block_device(endpoint)
    assert await nm.sh(f"cat /sys/block/{device.removeprefix('/dev/')}/ro") == "1"
    output, status = await nm.vm.console.run(
        f"dd if=/dev/zero of={device} bs=4096 count=1 oflag=direct")
    assert status != 0, output
    expected = hashlib.sha256(host_pattern()).hexdigest()
    assert await guest_sha256(nm, device, 0, HOST_SIZE) == expected
    assert image.read_bytes() == host_pattern() * 4
