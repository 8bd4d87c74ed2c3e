"""Booting the two guests the benchmarks compare, with the same kernel and initramfs tools.

* **ours**: :class:`qmp_harness.nested.NestedMachine` — ``vsmmu serve`` (its
  defaults: no ``--sanitize``) with a virtio-rng endpoint behind our vSMMU (a
  vfio-user PCI function), and with ``disk`` a virtio-blk endpoint over that raw
  image at :data:`DISK_SLOT`;
* **QEMU's**: ``-machine virt,iommu=smmuv3`` with QEMU's own
  ``virtio-rng-pci`` and, with ``disk``, ``virtio-blk-pci`` on the same raw
  image (both ``iommu_platform=on``, so their DMA goes through QEMU's SMMUv3
  as ours goes through our vSMMU).

Programs for the guest are put into the initramfs by an :class:`InitFragment`
that decodes them from base64 (the console is too slow to type them).
Every wait has a timeout; a failed boot becomes a BenchmarkError whose
message is the harness's failure report.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from benchmarks.report import BenchmarkError
from guest_images.initramfs import InitFragment
from qmp_harness.fixtures import GuestEnvironment, provision_environment
from qmp_harness.machine import DEFAULT_APPEND, BootError, Machine
from qmp_harness.nested import (
    BLK_MODULES,
    VIRTIO_BLK,
    NestedConfig,
    NestedEndpoint,
    NestedMachine,
    pci_bdf,
)

logger = logging.getLogger(__name__)

BOOT_TIMEOUT = 180.0
QEMU_SMMU_MACHINE_OPTION = "iommu=smmuv3"
QEMU_SMMU_BASE = 0x0905_0000
"""QEMU virt's own SMMUv3 (DESIGN.md §5)."""
QEMU_RNG_SLOT = 2
"""The same slot our endpoint uses, so both guests see the rng at 0000:00:02.0."""
DISK_SLOT = 3
"""Both guests see the disk at 0000:00:03.0."""
DISK_NODE = "bench-disk"
RELAXED_IOMEM = "iomem=relaxed"
"""Lets /dev/mem map a register range a driver claimed (Debian sets IO_STRICT_DEVMEM)."""


def qemu_rng_device() -> str:
    """QEMU's virtio-rng-pci behind its SMMUv3 (modern only, DMA through the IOMMU)."""
    return json.dumps({"driver": "virtio-rng-pci", "addr": f"{QEMU_RNG_SLOT:#x}",
                       "disable-legacy": "on", "iommu_platform": True})


def qemu_disk_args(disk: Path) -> tuple[str, list[str]]:
    """QEMU's virtio-blk-pci on the raw image ``disk`` behind its SMMUv3: -device, -blockdev."""
    device = json.dumps({"driver": "virtio-blk-pci", "addr": f"{DISK_SLOT:#x}",
                         "drive": DISK_NODE, "disable-legacy": "on", "iommu_platform": True})
    blockdev = json.dumps({"driver": "raw", "node-name": DISK_NODE,
                           "file": {"driver": "file", "filename": str(disk)}})
    return device, ["-blockdev", blockdev]


def disk_bdf() -> str:
    """The disk's PCI function in both guests."""
    return pci_bdf(DISK_SLOT)


def program_fragment(name: str, path: str, program: bytes) -> InitFragment:
    """An ``/init`` step writing ``program`` to ``path`` as an executable."""
    text = base64.b64encode(program).decode()
    return InitFragment(f"bench-{name}", f"echo {text} | base64 -d > {path}\nchmod 755 {path}\n")


def environment(cache: Path) -> GuestEnvironment:
    """QEMU and the guest kernel from ``cache`` (provisioned on demand)."""
    return provision_environment(cache.resolve())


@contextlib.asynccontextmanager
async def qemu_smmu_guest(env: GuestEnvironment, *, fragments: Sequence[InitFragment] = (),
                          append: Sequence[str] = (), modules: Sequence[str] = ("virtio_rng",),
                          disk: Path | None = None) -> AsyncIterator[Machine]:
    """A guest on ``virt,iommu=smmuv3`` with QEMU's virtio-rng-pci (and virtio-blk-pci on
    ``disk``), booted to its shell."""
    devices, extra = [qemu_rng_device()], []
    if disk is not None:
        device, extra = qemu_disk_args(disk)
        devices.append(device)
        modules = (*modules, *BLK_MODULES)
    config = env.machine_config(modules=modules, fragments=fragments, devices=devices,
                                append=" ".join([DEFAULT_APPEND, *append]), extra_args=extra)
    config = dataclasses.replace(config, machine_options=[QEMU_SMMU_MACHINE_OPTION])
    vm = Machine(env.qemu, config, name="bench-qemu-smmu")
    try:
        await vm.start()
        await vm.wait_ready(BOOT_TIMEOUT)
        yield vm
    except BootError as exc:
        raise BenchmarkError(f"QEMU-SMMUv3 guest: {exc}") from exc
    finally:
        await vm.shutdown()


@contextlib.asynccontextmanager
async def our_guest(env: GuestEnvironment, *, fragments: Sequence[InitFragment] = (),
                    append: Sequence[str] = (), disk: Path | None = None,
                    ) -> AsyncIterator[NestedMachine]:
    """A guest with our vSMMU and its virtio-rng endpoint (the e2e recipe), and a
    virtio-blk endpoint on ``disk``, at its shell."""
    # The service as ``vsmmu serve`` runs by default: without the sanitizer (a debugging
    # aid the e2e fixture turns on, which re-walks the tables of every DMA it checks).
    config = NestedConfig(fragments=tuple(fragments), append=tuple(append), sanitize=False)
    if disk is not None:
        blk = NestedEndpoint(DISK_SLOT, kind=VIRTIO_BLK, image=disk)
        config = dataclasses.replace(config, endpoints=(*config.endpoints, blk),
                                     modules=(*config.modules, *BLK_MODULES))
    nested = NestedMachine(env.qemu, env.guest, config, cache=env.cache, name="bench-ours")
    try:
        await nested.start(boot_timeout=BOOT_TIMEOUT)
        yield nested
    except BootError as exc:
        raise BenchmarkError(f"vSMMU guest: {exc}") from exc
    finally:
        await nested.close()
