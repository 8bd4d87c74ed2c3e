"""Conformance of the iommufd backends with the kernel's errno rules.

Drawn from tools/testing/selftests/iommu/iommufd.c and the kernel sources
(drivers/iommu/iommufd/*.c, arm-smmu-v3-iommufd.c).  Every case runs on the
sim (typed and raw-ioctl paths) here, and on the real kernel inside the host
lane: tests/host_lane/test_kernel_conformance.py boots L1 and runs this file
there with ``-k kernel``, where ``$VSMMU_HOST_LANE`` adds the kernel backend.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from qmp_harness import client_vmm
from vsmmu.arch.cd import Cd, Tg0
from vsmmu.arch.commands import CMD, CmdOpcode
from vsmmu.arch.ste import STE, Eats, SteConfig
from vsmmu.endpoints.iommu_testdev import Result
from vsmmu.iommufd import uapi, uapi_vfio
from vsmmu.iommufd.backend import DmaFault, HostMapping, IommufdBackend, IommufdError, ObjType
from vsmmu.iommufd.kernel import DEV_IOMMU, KernelIommufd
from vsmmu.iommufd.sim import QEMU_SMMUV3, HostPersonality, SimIommufd
from vsmmu.iommufd.vfio import VfioDevice, VfioRegion
from vsmmu.vfio_user import uapi as pci

PAGE = 4096
DMA_BYTES = 4
"""One aligned 4-byte write: one transaction, so one fault and one event."""
KERNEL_EVENT_SETTLE = 1.0
"""Seconds for L1's SMMU event IRQ thread to queue the faults just raised (generous)."""
CDEVS_VAR = "VSMMU_VFIO_CDEVS"
LANE_VAR = "VSMMU_HOST_LANE"
IN_LANE = os.environ.get(LANE_VAR) == "1"
"""Set by the host lane's /init: this process runs on the iommufd kernel in L1."""
BACKENDS = ["sim", "sim-ioctl", *(["kernel"] if IN_LANE else [])]


def kernel_skip_reason() -> str | None:
    """Why the kernel backend cannot run here, or None when it can.

    It needs /dev/iommu (a kernel with CONFIG_IOMMUFD; Debian's own kernels
    lack it, DESIGN.md §7) and VFIO cdevs of devices behind an SMMUv3 with
    nesting, listed in $VSMMU_VFIO_CDEVS (comma-separated /dev/vfio/devices/vfioN).
    The iommufd selftest mock device is not used: it is no SMMUv3, so the
    ARM vSTE/vIOMMU cases could not pass on it.
    """
    if not os.path.exists(DEV_IOMMU):
        return f"{DEV_IOMMU} absent: the running kernel has no CONFIG_IOMMUFD"
    if not os.access(DEV_IOMMU, os.R_OK | os.W_OK):
        return f"{DEV_IOMMU} exists but is not readable and writable by this user"
    cdevs = [c for c in os.environ.get(CDEVS_VAR, "").split(",") if c]
    if not cdevs:
        return (f"${CDEVS_VAR} unset: list VFIO cdevs (/dev/vfio/devices/vfioN) of devices "
                "behind a nesting-capable SMMUv3; the selftest mock device is no SMMUv3")
    missing = [c for c in cdevs if not os.path.exists(c)]
    if missing:
        return f"${CDEVS_VAR} names missing cdevs: {', '.join(missing)}"
    return None


@dataclass
class Env:
    """A backend, a way to create devices on it, and its raw /dev/iommu ioctl."""

    be: IommufdBackend
    new_device: Callable[[int], int]
    raw: Callable[[int, bytearray], None]
    dma: Callable[[int, int], bool]
    """The device writes 4 bytes at an IOVA through its SMMU; False when refused."""
    closers: list[Callable[[], None]] = field(default_factory=list)
    kind: str = ""
    settle: Callable[[], None] = lambda: None
    """Wait until faults have reached the vEVENTQ (the kernel's arrive through an IRQ thread)."""
    unbind: Callable[[int], None] = lambda dev: None
    """Unbind a device from the iommufd (close its VFIO cdev)."""

    def close(self) -> None:
        self.be.close()
        for close in self.closers:
            close()


class SimBehindIoctls:
    """Plays the kernel under a KernelIommufd: /dev/iommu requests go to ``SimIommufd.ioctl``.

    The VFIO cdev requests (bind, attach, detach) are not iommufd ioctls, so
    they go to the sim's device methods; ``next_sid`` is the physical StreamID
    of the next bound device.
    """

    def __init__(self, sim: SimIommufd) -> None:
        self.sim = sim
        self.devices: dict[int, int] = {}
        self.next_sid = 0

    def __call__(self, fd: int, request: int, arg: uapi.UapiStruct, mutate: bool) -> int:
        assert mutate
        if isinstance(arg, uapi.VfioDeviceBindIommufd):
            arg.out_devid = self.devices[fd] = self.sim.create_mock_device(self.next_sid)
        elif isinstance(arg, uapi.VfioDeviceAttachIommufdPt):
            arg.pt_id = self.sim.device_attach(self.devices[fd], arg.pt_id)
        elif isinstance(arg, uapi.VfioDeviceDetachIommufdPt):
            self.sim.device_detach(self.devices[fd])
        else:
            buf = bytearray(arg.to_bytes())
            try:
                self.sim.ioctl(request, buf)
            finally:
                # fcntl.ioctl copies the buffer back before raising, and so do we.
                ctypes.memmove(ctypes.addressof(arg), bytes(buf), len(buf))
        return 0


def sim_dma(sim: SimIommufd) -> Callable[[int, int], bool]:
    """The sim's physical SMMU translating a 4-byte write of device ``dev``."""
    def dma(dev: int, iova: int) -> bool:
        try:
            sim.dma_write(dev, iova, bytes(DMA_BYTES))
        except DmaFault:
            return False
        return True
    return dma


class CdevRegions:
    """QEMU's ``iommu-testdev`` in L1 through its VFIO cdev, regions by index, with bus
    mastering on (without it the DMA never reaches the SMMU)."""

    def __init__(self, device: VfioDevice) -> None:
        self.device = device
        config = device.region(uapi_vfio.PciRegionIndex.CONFIG)
        command = int.from_bytes(device.read(config, pci.PCI_COMMAND, 2), "little")
        command |= pci.PCI_COMMAND_MEMORY | pci.PCI_COMMAND_MASTER
        device.write(config, pci.PCI_COMMAND, command.to_bytes(2, "little"))

    def read(self, region: int, offset: int, size: int) -> bytes:
        return self.device.read(self._region(region), offset, size)

    def write(self, region: int, offset: int, data: bytes) -> None:
        self.device.write(self._region(region), offset, data)

    @functools.cache  # noqa: B019 - one per device, and the test ends with it
    def _region(self, index: int) -> VfioRegion:
        return self.device.region(index)


def make_env(kind: str, personality: HostPersonality | None = None) -> Env:
    # The sim plays the host the kernel cases run on: QEMU's SMMUv3 in the lane.
    personality = personality or QEMU_SMMUV3
    if kind == "sim":
        sim = SimIommufd(personality)
        return Env(sim, lambda sid: sim.create_mock_device(sid), sim.ioctl, sim_dma(sim),
                   unbind=sim.destroy_mock_device)
    if kind == "sim-ioctl":
        # The whole suite through the raw path: KernelIommufd's structures into SimIommufd.ioctl.
        router = SimBehindIoctls(SimIommufd(personality))
        via = KernelIommufd(fd=os.open(os.devnull, os.O_RDWR), ioctl_fn=router,
                            read_fn=router.sim.veventq_read)

        def bind(sid: int) -> int:
            router.next_sid = sid
            return via.bind_vfio_cdev(os.devnull)

        def unbind(dev: int) -> None:
            via.unbind_vfio_cdev(dev)  # closes the cdev: the sim's device goes with it
            router.sim.destroy_mock_device(dev)

        return Env(via, bind, router.sim.ioctl, sim_dma(router.sim), [router.sim.close],
                   unbind=unbind)
    reason = kernel_skip_reason()
    if reason is not None:
        # Only the lane collects the kernel backend, and there this is a broken lane.
        pytest.fail(f"host lane without a usable kernel backend: {reason}")
    kern = KernelIommufd()
    cdevs = [c for c in os.environ[CDEVS_VAR].split(",") if c]
    devices: dict[int, VfioDevice] = {}

    def new_device(sid: int) -> int:
        # The physical StreamID is the hardware's; ``sid`` only matters to the sim.
        del sid
        if not cdevs:
            pytest.fail(f"${CDEVS_VAR}: this case needs more cdevs than the lane bound")
        cdev = cdevs.pop(0)
        dev = kern.bind_vfio_cdev(cdev)
        devices[dev] = VfioDevice(kern.cdev_fd(dev), cdev)
        return dev

    def raw(request: int, buf: bytearray) -> None:
        fcntl.ioctl(kern.fd, request, buf, True)

    def dma(dev: int, iova: int) -> bool:
        return client_vmm.Testdev(CdevRegions(devices[dev])).dma(iova, DMA_BYTES, 0) == Result.OK

    return Env(kern, new_device, raw, dma, settle=lambda: time.sleep(KERNEL_EVENT_SETTLE),
               unbind=kern.unbind_vfio_cdev)


@pytest.fixture(params=BACKENDS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    e = make_env(request.param)
    e.kind = request.param
    yield e
    e.close()


def expect(err: int, fn: Callable[[], object]) -> IommufdError:
    with pytest.raises(IommufdError) as info:
        fn()
    assert info.value.errno == err, str(info.value)
    return info.value


def vste(cfg: int = SteConfig.S1_TRANS, w1: int = 0, ptr: int = 0x4000_0000) -> tuple[int, int]:
    w0 = STE.V.put(0, 1)
    w0 = STE.CONFIG.put(w0, cfg)
    w0 = STE.S1CONTEXTPTR.put(w0, ptr)
    return w0, w1


@dataclass
class Nest:
    dev: int
    ioas: int
    s2: int
    viommu: int


def nest(e: Env, sid: int = 0x10) -> Nest:
    dev = e.new_device(sid)
    ioas = e.be.ioas_alloc()
    s2 = e.be.hwpt_alloc(dev, ioas, flags=uapi.HwptAllocFlags.NEST_PARENT)
    viommu = e.be.viommu_alloc(dev, s2)
    return Nest(dev, ioas, s2, viommu)


def cmd(opcode: int, **fields: int) -> tuple[int, int]:
    w0 = CMD.OPCODE.put(0, opcode)
    w1 = 0
    for name, value in fields.items():
        f = getattr(CMD, name)
        if f.word == 0:
            w0 = f.put(w0, value)
        else:
            w1 = f.put(w1, value)
    return w0, w1


# --- object ids and destroy ---


def test_ids_start_at_one(env: Env) -> None:
    assert env.be.ioas_alloc() == 1


def test_lowest_free_id_is_reused(env: Env) -> None:
    a, b, c = (env.be.ioas_alloc() for _ in range(3))
    env.be.destroy(b)
    assert env.be.ioas_alloc() == b
    assert (a, c) == (1, 3)


def test_destroy_unknown_is_enoent(env: Env) -> None:
    expect(errno.ENOENT, lambda: env.be.destroy(999))


def test_destroy_twice_is_enoent(env: Env) -> None:
    i = env.be.ioas_alloc()
    env.be.destroy(i)
    expect(errno.ENOENT, lambda: env.be.destroy(i))


def test_destroy_ioas_under_hwpt_is_ebusy(env: Env) -> None:
    n = nest(env)
    expect(errno.EBUSY, lambda: env.be.destroy(n.ioas))


def test_destroy_s2_under_viommu_is_ebusy(env: Env) -> None:
    n = nest(env)
    expect(errno.EBUSY, lambda: env.be.destroy(n.s2))


def test_destroy_viommu_with_vdevice_is_ebusy(env: Env) -> None:
    n = nest(env)
    env.be.vdevice_alloc(n.viommu, n.dev, 0x10)
    expect(errno.EBUSY, lambda: env.be.destroy(n.viommu))


def test_destroy_viommu_with_veventq_is_ebusy(env: Env) -> None:
    n = nest(env)
    q = env.be.veventq_alloc(n.viommu, 4)
    os.close(q.fd)
    expect(errno.EBUSY, lambda: env.be.destroy(n.viommu))


def test_destroy_viommu_with_nested_hwpt_is_ebusy(env: Env) -> None:
    n = nest(env)
    env.be.hwpt_alloc(n.dev, n.viommu, data=vste(SteConfig.ABORT))
    expect(errno.EBUSY, lambda: env.be.destroy(n.viommu))


def test_destroy_attached_nested_hwpt_is_ebusy(env: Env) -> None:
    n = nest(env)
    h = env.be.hwpt_alloc(n.dev, n.viommu, data=vste(SteConfig.BYPASS))
    env.be.device_attach(n.dev, h)
    expect(errno.EBUSY, lambda: env.be.destroy(h))


def test_teardown_in_reverse_order_empties_the_table(env: Env) -> None:
    n = nest(env)
    vdev = env.be.vdevice_alloc(n.viommu, n.dev, 0x10)
    q = env.be.veventq_alloc(n.viommu, 4)
    h = env.be.hwpt_alloc(n.dev, n.viommu, data=vste())
    env.be.device_attach(n.dev, h)
    env.be.device_detach(n.dev)
    os.close(q.fd)
    for obj in (h, q.id, vdev, n.viommu, n.s2, n.ioas):
        env.be.destroy(obj)
    assert [o.type for o in env.be.objects()] == [ObjType.DEVICE]


# --- IOAS map/unmap ---


def test_map_fixed_iova_returns_it(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    assert env.be.ioas_map(ioas, HostMapping(bytearray(2 * PAGE)), iova=0x10000) == 0x10000


def test_map_overlap_is_eexist(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    env.be.ioas_map(ioas, HostMapping(bytearray(2 * PAGE)), iova=0x10000)
    expect(errno.EEXIST, lambda: env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)), iova=0x11000))


def test_map_bad_ioas_is_enoent(env: Env) -> None:
    expect(errno.ENOENT, lambda: env.be.ioas_map(77, HostMapping(bytearray(PAGE)), iova=0))


def test_map_without_fixed_iova_avoids_existing(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    first = env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)))
    second = env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)))
    assert abs(first - second) >= PAGE


def test_unmap_nothing_is_enoent(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    expect(errno.ENOENT, lambda: env.be.ioas_unmap(ioas, 0x10000, PAGE))


def test_unmap_splitting_a_mapping_is_enoent(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    env.be.ioas_map(ioas, HostMapping(bytearray(4 * PAGE)), iova=0x10000)
    expect(errno.ENOENT, lambda: env.be.ioas_unmap(ioas, 0x11000, PAGE))


def test_unmap_everything_returns_total_length(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    env.be.ioas_map(ioas, HostMapping(bytearray(2 * PAGE)), iova=0x10000)
    env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)), iova=0x40000)
    assert env.be.ioas_unmap(ioas, 0, uapi.U64_MAX) == 3 * PAGE


def test_unmap_bad_ioas_is_enoent(env: Env) -> None:
    expect(errno.ENOENT, lambda: env.be.ioas_unmap(55, 0, PAGE))


def test_iova_ranges_bad_ioas_is_enoent(env: Env) -> None:
    expect(errno.ENOENT, lambda: env.be.ioas_iova_ranges(55))


def test_iova_ranges_of_fresh_ioas_is_nonempty(env: Env) -> None:
    ranges, align = env.be.ioas_iova_ranges(env.be.ioas_alloc())
    assert ranges and align >= 1


# --- HWPT_ALLOC ---


def test_hwpt_bad_dev_is_enoent(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    expect(errno.ENOENT, lambda: env.be.hwpt_alloc(999, ioas))


def test_hwpt_bad_pt_id_is_einval(env: Env) -> None:
    dev = env.new_device(1)
    expect(errno.EINVAL, lambda: env.be.hwpt_alloc(dev, 999))


def test_hwpt_unknown_flag_is_eopnotsupp(env: Env) -> None:
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    expect(errno.EOPNOTSUPP, lambda: env.be.hwpt_alloc(dev, ioas, flags=1 << 30))


def test_hwpt_paging_with_data_type_is_eopnotsupp(env: Env) -> None:
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    expect(errno.EOPNOTSUPP, lambda: env.be.hwpt_alloc(dev, ioas, data=vste()))


def test_hwpt_data_type_none_with_length_is_einval(env: Env) -> None:
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.hwpt_alloc(n.dev, n.viommu, data=vste(), data_type=0))


def test_hwpt_data_type_without_length_is_einval(env: Env) -> None:
    n = nest(env)
    expect(
        errno.EINVAL,
        lambda: env.be.hwpt_alloc(n.dev, n.viommu, data_type=uapi.HwptDataType.ARM_SMMUV3),
    )


def test_nested_on_hwpt_paging_is_eopnotsupp(env: Env) -> None:
    n = nest(env)
    expect(errno.EOPNOTSUPP, lambda: env.be.hwpt_alloc(n.dev, n.s2, data=vste()))


def test_nested_wrong_data_type_is_einval(env: Env) -> None:
    n = nest(env)
    expect(
        errno.EINVAL,
        lambda: env.be.hwpt_alloc(n.dev, n.viommu, data=vste(), data_type=uapi.HwptDataType.VTD_S1),
    )


def test_nested_short_data_is_einval(env: Env) -> None:
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.hwpt_alloc(n.dev, n.viommu, data=vste(), data_len=8))


def test_nested_flags_are_eopnotsupp(env: Env) -> None:
    n = nest(env)
    flags = uapi.HwptAllocFlags.NEST_PARENT
    expect(errno.EOPNOTSUPP, lambda: env.be.hwpt_alloc(n.dev, n.viommu, flags=flags, data=vste()))


VSTE_CASES = [
    ("v0_garbage_accepted", (STE.S1CONTEXTPTR.put(0, 0x1000) | (1 << 60), 1 << 19), 0),
    ("abort", vste(SteConfig.ABORT), 0),
    ("bypass", vste(SteConfig.BYPASS), 0),
    ("s1_translate", vste(), 0),
    ("eats_full", vste(w1=STE.EATS.put(0, Eats.FULL)), 0),
    ("eats_split", vste(w1=STE.EATS.put(0, Eats.SPLIT)), errno.EIO),
    ("cfg_s2", vste(SteConfig.S2_TRANS), errno.EIO),
    ("cfg_nested", vste(SteConfig.NESTED), errno.EIO),
    ("cfg_reserved", vste(0b001), errno.EIO),
    ("w0_disallowed_bit", (vste()[0] | (1 << 52), 0), errno.EIO),
    ("w1_mev_disallowed", vste(w1=STE.MEV.put(0, 1)), errno.EIO),
    ("w1_strw_disallowed", vste(w1=STE.STRW.put(0, 2)), errno.EIO),
]


@pytest.mark.parametrize(
    ("ste", "err"), [c[1:] for c in VSTE_CASES], ids=[c[0] for c in VSTE_CASES]
)
def test_vste_validation(env: Env, ste: tuple[int, int], err: int) -> None:
    n = nest(env)
    if err:
        expect(err, lambda: env.be.hwpt_alloc(n.dev, n.viommu, data=ste))
    else:
        assert env.be.hwpt_alloc(n.dev, n.viommu, data=ste) > n.viommu


@pytest.mark.parametrize("kind", ["sim", "sim-ioctl"])
def test_host_rejecting_ats_makes_eats_eio(kind: str) -> None:
    e = make_env(kind, HostPersonality(ats_in_nested=False))
    n = nest(e)
    expect(errno.EIO, lambda: e.be.hwpt_alloc(n.dev, n.viommu, data=vste(w1=STE.EATS.put(0, 1))))


@pytest.mark.parametrize("kind", ["sim", "sim-ioctl"])
def test_host_without_nesting_refuses_nest_parent(kind: str) -> None:
    e = make_env(kind, HostPersonality(nesting=False))
    dev = e.new_device(1)
    ioas = e.be.ioas_alloc()
    expect(
        errno.EOPNOTSUPP,
        lambda: e.be.hwpt_alloc(dev, ioas, flags=uapi.HwptAllocFlags.NEST_PARENT),
    )


# --- vIOMMU ---


def test_viommu_on_non_parent_is_einval(env: Env) -> None:
    dev = env.new_device(1)
    hwpt = env.be.hwpt_alloc(dev, env.be.ioas_alloc())
    expect(errno.EINVAL, lambda: env.be.viommu_alloc(dev, hwpt))


def test_viommu_bad_hwpt_is_enoent(env: Env) -> None:
    dev = env.new_device(1)
    expect(errno.ENOENT, lambda: env.be.viommu_alloc(dev, 999))


def test_viommu_bad_dev_is_enoent(env: Env) -> None:
    n = nest(env)
    expect(errno.ENOENT, lambda: env.be.viommu_alloc(999, n.s2))


def test_viommu_default_type_is_eopnotsupp(env: Env) -> None:
    n = nest(env)
    expect(errno.EOPNOTSUPP, lambda: env.be.viommu_alloc(n.dev, n.s2, type_=0))


def test_viommu_flags_are_eopnotsupp(env: Env) -> None:
    n = nest(env)
    expect(errno.EOPNOTSUPP, lambda: env.be.viommu_alloc(n.dev, n.s2, flags=1))


@pytest.mark.parametrize("kind", ["sim", "sim-ioctl"])
def test_viommu_needs_canwbs_or_s2fwb(kind: str) -> None:
    e = make_env(kind, HostPersonality(canwbs=False, s2fwb=False))
    dev = e.new_device(1)
    s2 = e.be.hwpt_alloc(dev, e.be.ioas_alloc(), flags=uapi.HwptAllocFlags.NEST_PARENT)
    expect(errno.EOPNOTSUPP, lambda: e.be.viommu_alloc(dev, s2))


# --- vDEVICE ---


def test_second_vdevice_for_a_device_is_eexist(env: Env) -> None:
    n = nest(env)
    env.be.vdevice_alloc(n.viommu, n.dev, 1)
    expect(errno.EEXIST, lambda: env.be.vdevice_alloc(n.viommu, n.dev, 2))


def test_taken_virt_id_is_eexist(env: Env) -> None:
    n = nest(env)
    other = env.new_device(0x20)
    env.be.vdevice_alloc(n.viommu, n.dev, 5)
    expect(errno.EEXIST, lambda: env.be.vdevice_alloc(n.viommu, other, 5))


def test_vdevice_bad_viommu_is_enoent(env: Env) -> None:
    n = nest(env)
    expect(errno.ENOENT, lambda: env.be.vdevice_alloc(999, n.dev, 1))


def test_vdevice_bad_dev_is_enoent(env: Env) -> None:
    n = nest(env)
    expect(errno.ENOENT, lambda: env.be.vdevice_alloc(n.viommu, 999, 1))


def test_vdevice_virt_id_beyond_ulong_is_einval(env: Env) -> None:
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.vdevice_alloc(n.viommu, n.dev, uapi.ULONG_MAX + 1))


def test_vdevice_destroy_frees_virt_id(env: Env) -> None:
    n = nest(env)
    v = env.be.vdevice_alloc(n.viommu, n.dev, 7)
    env.be.destroy(v)
    assert env.be.vdevice_alloc(n.viommu, n.dev, 7) == v


# --- attach ---


def test_attach_translate_without_vdevice_is_enoent(env: Env) -> None:
    n = nest(env)
    h = env.be.hwpt_alloc(n.dev, n.viommu, data=vste())
    expect(errno.ENOENT, lambda: env.be.device_attach(n.dev, h))


@pytest.mark.parametrize("cfg", [SteConfig.ABORT, SteConfig.BYPASS])
def test_attach_abort_or_bypass_without_vdevice_is_allowed(env: Env, cfg: int) -> None:
    n = nest(env)
    h = env.be.hwpt_alloc(n.dev, n.viommu, data=vste(cfg))
    env.be.device_attach(n.dev, h)
    expect(errno.EBUSY, lambda: env.be.destroy(h))


def test_replace_unattached_is_einval(env: Env) -> None:
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.device_replace(n.dev, n.s2))


def test_attach_bad_pt_is_enoent(env: Env) -> None:
    n = nest(env)
    expect(errno.ENOENT, lambda: env.be.device_attach(n.dev, 999))


def test_replace_moves_the_reference(env: Env) -> None:
    n = nest(env)
    a = env.be.hwpt_alloc(n.dev, n.viommu, data=vste(SteConfig.ABORT))
    b = env.be.hwpt_alloc(n.dev, n.viommu, data=vste(SteConfig.BYPASS))
    env.be.device_attach(n.dev, a)
    env.be.device_replace(n.dev, b)
    env.be.destroy(a)
    expect(errno.EBUSY, lambda: env.be.destroy(b))


def test_attach_to_ioas_pins_it_until_detach(env: Env) -> None:
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    env.be.device_attach(dev, ioas)
    expect(errno.EBUSY, lambda: env.be.destroy(ioas))
    env.be.device_detach(dev)
    env.be.destroy(ioas)


# --- invalidation ---

ALLOWED = [
    cmd(CmdOpcode.TLBI_NSNH_ALL),
    cmd(CmdOpcode.TLBI_NH_ALL, VMID=0x55),
    cmd(CmdOpcode.TLBI_NH_ASID, ASID=3),
    cmd(CmdOpcode.TLBI_NH_VA, ASID=3, VA=0x1000),
    cmd(CmdOpcode.TLBI_NH_VAA, VA=0x2000),
    cmd(CmdOpcode.CFGI_CD, SID=0x10),
    cmd(CmdOpcode.CFGI_CD_ALL, SID=0x10),
]


ALLOWED_IDS = [CmdOpcode(CMD.OPCODE.get(c[0])).name for c in ALLOWED]


@pytest.mark.parametrize("entry", ALLOWED, ids=ALLOWED_IDS)
def test_allowed_invalidation_is_handled(env: Env, entry: tuple[int, int]) -> None:
    n = nest(env)
    env.be.vdevice_alloc(n.viommu, n.dev, 0x10)
    assert env.be.hwpt_invalidate(n.viommu, [entry]) == 1


REFUSED = [CmdOpcode.CFGI_STE, CmdOpcode.TLBI_S12_VMALL, CmdOpcode.TLBI_EL2_ALL, CmdOpcode.SYNC]


@pytest.mark.parametrize("opcode", REFUSED, ids=[o.name for o in REFUSED])
def test_refused_opcode_is_eio_at_its_index(env: Env, opcode: CmdOpcode) -> None:
    n = nest(env)
    entries = [cmd(CmdOpcode.TLBI_NSNH_ALL), cmd(CmdOpcode.TLBI_NH_ALL), cmd(opcode)]
    exc = expect(errno.EIO, lambda: env.be.hwpt_invalidate(n.viommu, entries))
    assert exc.handled == 2


def test_cfgi_cd_for_unknown_vsid_is_eio(env: Env) -> None:
    n = nest(env)
    entries = [cmd(CmdOpcode.CFGI_CD, SID=9)]
    exc = expect(errno.EIO, lambda: env.be.hwpt_invalidate(n.viommu, entries))
    assert exc.handled == 0


def test_invalidate_nested_hwpt_is_eopnotsupp(env: Env) -> None:
    n = nest(env)
    h = env.be.hwpt_alloc(n.dev, n.viommu, data=vste(SteConfig.ABORT))
    expect(errno.EOPNOTSUPP, lambda: env.be.hwpt_invalidate(h, [cmd(CmdOpcode.TLBI_NSNH_ALL)]))


def test_invalidate_paging_hwpt_is_einval(env: Env) -> None:
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.hwpt_invalidate(n.s2, [cmd(CmdOpcode.TLBI_NSNH_ALL)]))


def test_invalidate_unknown_id_is_enoent(env: Env) -> None:
    expect(errno.ENOENT, lambda: env.be.hwpt_invalidate(999, [cmd(CmdOpcode.TLBI_NSNH_ALL)]))


def test_invalidate_empty_array_is_einval(env: Env) -> None:
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.hwpt_invalidate(n.viommu, []))


def test_invalidate_wrong_data_type_is_einval(env: Env) -> None:
    n = nest(env)
    entries = [cmd(CmdOpcode.TLBI_NSNH_ALL)]
    expect(errno.EINVAL, lambda: env.be.hwpt_invalidate(n.viommu, entries, data_type=0))


def test_invalidate_zero_entry_len_is_einval(env: Env) -> None:
    n = nest(env)
    entries = [cmd(CmdOpcode.TLBI_NSNH_ALL)]
    expect(errno.EINVAL, lambda: env.be.hwpt_invalidate(n.viommu, entries, entry_len=0))


# --- vEVENTQ ---


def test_veventq_depth_zero_is_einval(env: Env) -> None:
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.veventq_alloc(n.viommu, 0))


def test_second_veventq_of_a_type_is_eexist(env: Env) -> None:
    n = nest(env)
    q = env.be.veventq_alloc(n.viommu, 2)
    expect(errno.EEXIST, lambda: env.be.veventq_alloc(n.viommu, 2))
    os.close(q.fd)


def test_veventq_default_type_is_eopnotsupp(env: Env) -> None:
    n = nest(env)
    expect(errno.EOPNOTSUPP, lambda: env.be.veventq_alloc(n.viommu, 2, type_=0))


def test_veventq_flags_are_eopnotsupp(env: Env) -> None:
    n = nest(env)
    expect(errno.EOPNOTSUPP, lambda: env.be.veventq_alloc(n.viommu, 2, flags=1))


def test_veventq_bad_viommu_is_enoent(env: Env) -> None:
    expect(errno.ENOENT, lambda: env.be.veventq_alloc(999, 2))


# --- hw_info ---


def test_hw_info_bad_dev_is_enoent(env: Env) -> None:
    expect(errno.ENOENT, lambda: env.be.hw_info(999))


def test_hw_info_reports_arm_smmuv3(env: Env) -> None:
    info = env.be.hw_info(env.new_device(1))
    assert info.data_type == uapi.HwInfoType.ARM_SMMUV3
    assert len(info.data) == ctypes.sizeof(uapi.IommuHwInfoArmSmmuv3)


def test_hw_info_unsupported_type_is_eopnotsupp(env: Env) -> None:
    dev = env.new_device(1)
    expect(errno.EOPNOTSUPP, lambda: env.be.hw_info(dev, uapi.HwInfoType.INTEL_VTD))


# --- raw ioctl dispatch: the size rules of iommufd_fops_ioctl ---


def expect_raw(err: int, env: Env, request: int, buf: bytearray) -> None:
    with pytest.raises(OSError) as info:
        env.raw(request, buf)
    assert info.value.errno == err, str(info.value)


def sized(cls: type[uapi.UapiStruct], size: int, **values: int) -> bytearray:
    """A ``size``-byte user buffer holding ``cls`` with ``values`` and its size field."""
    inst = cls(**values)
    ctypes.c_uint32.from_buffer(inst).value = size
    return bytearray(inst.to_bytes()[:size].ljust(size, b"\0"))


MIN_SIZES = [(req, cls, min_size) for req, (cls, min_size) in uapi.IOCTL_STRUCTS.items()]


@pytest.mark.parametrize(("request_", "cls", "min_size"), MIN_SIZES,
                         ids=[r.name for r, _, _ in MIN_SIZES])
def test_raw_size_below_minimum_is_einval(
    env: Env, request_: uapi.Ioctl, cls: type[uapi.UapiStruct], min_size: int
) -> None:
    expect_raw(errno.EINVAL, env, request_, sized(cls, min_size - 1))


def test_raw_larger_struct_with_nonzero_tail_is_e2big(env: Env) -> None:
    size = ctypes.sizeof(uapi.IommuIoasAlloc)
    buf = sized(uapi.IommuIoasAlloc, size + 8)
    buf[size + 3] = 1
    expect_raw(errno.E2BIG, env, uapi.Ioctl.IOMMU_IOAS_ALLOC, buf)
    assert env.be.ioas_alloc() == 1, "the refused ioctl must not have allocated"


def test_raw_larger_struct_with_zero_tail_is_accepted(env: Env) -> None:
    size = ctypes.sizeof(uapi.IommuIoasAlloc)
    buf = sized(uapi.IommuIoasAlloc, size + 8)
    env.raw(uapi.Ioctl.IOMMU_IOAS_ALLOC, buf)
    assert uapi.IommuIoasAlloc.from_buffer_copy(buf[:size]).out_ioas_id == 1
    assert not any(buf[size:]), "nothing is written past the kernel's structure"


def test_raw_first_version_hwpt_alloc_is_zero_extended(env: Env) -> None:
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    buf = sized(uapi.IommuHwptAlloc, uapi.HWPT_ALLOC_MIN_SIZE, dev_id=dev, pt_id=ioas,
                flags=uapi.HwptAllocFlags.NEST_PARENT)
    env.raw(uapi.Ioctl.IOMMU_HWPT_ALLOC, buf)
    assert len(buf) == uapi.HWPT_ALLOC_MIN_SIZE
    hwpt = int.from_bytes(buf[uapi.IommuHwptAlloc.out_hwpt_id.offset:][:4], "little")
    assert hwpt > ioas
    assert env.be.viommu_alloc(dev, hwpt) > hwpt, "the short HWPT_ALLOC made a nest parent"


@pytest.mark.parametrize("request_", [uapi.io(uapi.IOMMUFD_TYPE, 0x7F),
                                      uapi.io(uapi.IOMMUFD_TYPE, 0xFE)],
                         ids=["below_base", "beyond_table"])
def test_raw_unknown_ioctl_is_enotty(env: Env, request_: int) -> None:
    expect_raw(errno.ENOTTY, env, request_, sized(uapi.IommuDestroy, 8))


def test_raw_nonzero_reserved_is_eopnotsupp(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    buf = sized(uapi.IommuIoasIovaRanges, ctypes.sizeof(uapi.IommuIoasIovaRanges), ioas_id=ioas,
                reserved=1)
    expect_raw(errno.EOPNOTSUPP, env, uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES, buf)


def test_raw_and_typed_paths_share_one_object_table(env: Env) -> None:
    typed = env.be.ioas_alloc()
    buf = sized(uapi.IommuIoasAlloc, ctypes.sizeof(uapi.IommuIoasAlloc))
    env.raw(uapi.Ioctl.IOMMU_IOAS_ALLOC, buf)
    raw_id = uapi.IommuIoasAlloc.from_buffer_copy(buf).out_ioas_id
    assert raw_id == typed + 1
    env.raw(uapi.Ioctl.IOMMU_DESTROY, sized(uapi.IommuDestroy, 8, id=typed))
    assert env.be.ioas_alloc() == typed, "the raw DESTROY freed the typed object's id"
    expect_raw(errno.ENOENT, env, uapi.Ioctl.IOMMU_DESTROY, sized(uapi.IommuDestroy, 8, id=99))


def test_raw_invalidate_reports_entry_num_on_failure(env: Env) -> None:
    n = nest(env)
    good = cmd(CmdOpcode.TLBI_NH_ALL)
    bad = cmd(CmdOpcode.CFGI_STE)
    array = (ctypes.c_uint64 * 6)(*good, *bad, *good)
    buf = sized(uapi.IommuHwptInvalidate, 32, hwpt_id=n.viommu, data_uptr=ctypes.addressof(array),
                data_type=uapi.HwptInvalidateDataType.ARM_SMMUV3, entry_len=16, entry_num=3)
    expect_raw(errno.EIO, env, uapi.Ioctl.IOMMU_HWPT_INVALIDATE, buf)
    assert uapi.IommuHwptInvalidate.from_buffer_copy(buf).entry_num == 1


def test_raw_invalidate_long_entry_with_nonzero_tail_is_e2big(env: Env) -> None:
    n = nest(env)
    entry = bytearray(24)
    entry[:16] = struct.pack("<QQ", *cmd(CmdOpcode.TLBI_NH_ALL))
    entry[20] = 1
    array = ctypes.create_string_buffer(bytes(entry), 24)
    buf = sized(uapi.IommuHwptInvalidate, 32, hwpt_id=n.viommu, data_uptr=ctypes.addressof(array),
                data_type=uapi.HwptInvalidateDataType.ARM_SMMUV3, entry_len=24, entry_num=1)
    expect_raw(errno.E2BIG, env, uapi.Ioctl.IOMMU_HWPT_INVALIDATE, buf)
    assert uapi.IommuHwptInvalidate.from_buffer_copy(buf).entry_num == 0


def test_raw_iova_ranges_too_small_is_emsgsize_with_the_count(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    buf = sized(uapi.IommuIoasIovaRanges, 32, ioas_id=ioas, num_iovas=0)
    expect_raw(errno.EMSGSIZE, env, uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES, buf)
    assert uapi.IommuIoasIovaRanges.from_buffer_copy(buf).num_iovas >= 1


def test_sim_raw_size_beyond_the_buffer_is_efault() -> None:
    """The sim cannot fault on user memory, so a size larger than the buffer is EFAULT."""
    sim = SimIommufd()
    buf = sized(uapi.IommuIoasAlloc, ctypes.sizeof(uapi.IommuIoasAlloc))
    buf[:4] = (len(buf) + 8).to_bytes(4, "little")
    with pytest.raises(IommufdError) as info:
        sim.ioctl(uapi.Ioctl.IOMMU_IOAS_ALLOC, buf)
    assert info.value.errno == errno.EFAULT
    with pytest.raises(IommufdError) as info:
        sim.ioctl(uapi.Ioctl.IOMMU_IOAS_ALLOC, bytearray(2))
    assert info.value.errno == errno.EFAULT
    assert sim.objects() == []


# === Cases read from the kernel's source ===========================================
# Each cites the line of Debian's linux-source-7.3 (7.3.4) that decides it, as
# <file>:<line> relative to the source root; DI = drivers/iommu/iommufd,
# AS = drivers/iommu/arm/arm-smmu-v3/arm-smmu-v3-iommufd.c.  The lane
# (tests/host_lane/) runs every one of them on that kernel.

ULONG_MAX = (1 << 64) - 1
VEVENTQ_MAX_DEPTH = 1 << 19  # DI/eventq.c:504
INVALIDATE_ENTRY_NUM_MAX = 1 << 19  # DI/hw_pagetable.c:506


def raw_ok(env: Env, request: int, cls: type[uapi.UapiStruct], **values: int) -> bytearray:
    """Issue ``request`` with ``cls(**values)`` and return the buffer as the kernel left it."""
    buf = sized(cls, ctypes.sizeof(cls), **values)
    env.raw(request, buf)
    return buf


def raw_err(err: int, env: Env, request: int, cls: type[uapi.UapiStruct],
            **values: int) -> bytearray:
    """Issue ``request``, expect ``err``, return the buffer as the kernel left it."""
    buf = sized(cls, ctypes.sizeof(cls), **values)
    expect_raw(err, env, request, buf)
    return buf


def user_buffer(length: int, fill: int = 0) -> ctypes.Array[ctypes.c_char]:
    """A user buffer the ioctl may read or write (kept alive by the caller)."""
    return ctypes.create_string_buffer(bytes([fill]) * length, length)


RW = uapi.IoasMapFlags.READABLE | uapi.IoasMapFlags.WRITEABLE


def map_args(ioas: int, mem: ctypes.Array[ctypes.c_char], **values: int) -> dict[str, int]:
    args = {"ioas_id": ioas, "user_va": ctypes.addressof(mem), "length": PAGE,
            "flags": RW | uapi.IoasMapFlags.FIXED_IOVA, "iova": 0x10000}
    args.update(values)
    return args


# --- IOAS_ALLOC, IOAS_MAP: check order and written-back fields ---


def test_ioas_alloc_flags_are_eopnotsupp(env: Env) -> None:
    """DI/ioas.c:44."""
    raw_err(errno.EOPNOTSUPP, env, uapi.Ioctl.IOMMU_IOAS_ALLOC, uapi.IommuIoasAlloc, flags=1)
    assert env.be.ioas_alloc() == 1, "the refused ALLOC must not have taken an id"


def test_map_unknown_flag_wins_over_a_missing_ioas(env: Env) -> None:
    """DI/ioas.c:252: flags are checked before the IOAS is looked up."""
    mem = user_buffer(PAGE)
    raw_err(errno.EOPNOTSUPP, env, uapi.Ioctl.IOMMU_IOAS_MAP, uapi.IommuIoasMap,
            **map_args(99, mem, flags=RW | (1 << 3)))


def test_map_nonzero_reserved_is_eopnotsupp(env: Env) -> None:
    """DI/ioas.c:255."""
    mem = user_buffer(PAGE)
    raw_err(errno.EOPNOTSUPP, env, uapi.Ioctl.IOMMU_IOAS_MAP, uapi.IommuIoasMap,
            **map_args(env.be.ioas_alloc(), mem, reserved=1))


@pytest.mark.parametrize("field", ["iova", "length"])
def test_map_beyond_ulong_is_eoverflow(env: Env, field: str) -> None:
    """DI/ioas.c:257: iova or length >= ULONG_MAX."""
    mem = user_buffer(PAGE)
    raw_err(errno.EOVERFLOW, env, uapi.Ioctl.IOMMU_IOAS_MAP, uapi.IommuIoasMap,
            **map_args(env.be.ioas_alloc(), mem, **{field: ULONG_MAX}))


def test_map_eoverflow_wins_over_missing_access(env: Env) -> None:
    """DI/ioas.c:257 before DI/ioas.c:260."""
    mem = user_buffer(PAGE)
    raw_err(errno.EOVERFLOW, env, uapi.Ioctl.IOMMU_IOAS_MAP, uapi.IommuIoasMap,
            **map_args(env.be.ioas_alloc(), mem, flags=uapi.IoasMapFlags.FIXED_IOVA,
                       iova=ULONG_MAX))


def test_map_without_read_or_write_is_einval_before_the_ioas_lookup(env: Env) -> None:
    """DI/ioas.c:260 precedes the lookup at DI/ioas.c:264."""
    mem = user_buffer(PAGE)
    raw_err(errno.EINVAL, env, uapi.Ioctl.IOMMU_IOAS_MAP, uapi.IommuIoasMap,
            **map_args(99, mem, flags=uapi.IoasMapFlags.FIXED_IOVA))


def test_map_length_zero_is_einval(env: Env) -> None:
    """DI/pages.c:1377."""
    mem = user_buffer(PAGE)
    raw_err(errno.EINVAL, env, uapi.Ioctl.IOMMU_IOAS_MAP, uapi.IommuIoasMap,
            **map_args(env.be.ioas_alloc(), mem, length=0))


def test_map_writes_back_the_chosen_iova(env: Env) -> None:
    """DI/ioas.c:273: without FIXED_IOVA the kernel writes the IOVA it chose."""
    mem = user_buffer(PAGE)
    buf = raw_ok(env, uapi.Ioctl.IOMMU_IOAS_MAP, uapi.IommuIoasMap,
                 **map_args(env.be.ioas_alloc(), mem, flags=RW, iova=0))
    iova = uapi.IommuIoasMap.from_buffer_copy(buf).iova
    # Any IOVA may be chosen; the mapping must be where the written-back field says.
    assert env.be.ioas_unmap(1, iova, PAGE) == PAGE


def test_map_unaligned_without_a_domain_is_accepted(env: Env) -> None:
    """DI/io_pagetable.c:1032 (alignment 1 until a domain is added), :190 and :273."""
    ioas = env.be.ioas_alloc()
    assert env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)), iova=0x10001) == 0x10001
    assert env.be.ioas_unmap(ioas, 0x10001, PAGE) == PAGE


def test_iova_alignment_is_one_without_a_domain(env: Env) -> None:
    """DI/io_pagetable.c:1032, reported by DI/ioas.c:87."""
    assert env.be.ioas_iova_ranges(env.be.ioas_alloc())[1] == 1


def test_iova_alignment_is_a_page_once_a_domain_is_added(env: Env) -> None:
    """DI/hw_pagetable.c:211 adds the domain; DI/io_pagetable.c:1249 raises the alignment."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    env.be.hwpt_alloc(dev, ioas)
    assert env.be.ioas_iova_ranges(ioas)[1] == PAGE


def test_map_unaligned_iova_with_a_domain_is_einval(env: Env) -> None:
    """DI/io_pagetable.c:190 with the page alignment of DI/io_pagetable.c:1249."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    env.be.hwpt_alloc(dev, ioas)
    expect(errno.EINVAL, lambda: env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)),
                                                 iova=0x10001))


def test_map_unaligned_length_with_a_domain_is_einval(env: Env) -> None:
    """DI/io_pagetable.c:273."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    env.be.hwpt_alloc(dev, ioas)
    expect(errno.EINVAL, lambda: env.be.ioas_map(ioas, HostMapping(bytearray(100)),
                                                 iova=0x10000))


def test_domain_refused_while_an_unaligned_mapping_exists(env: Env) -> None:
    """DI/io_pagetable.c:1208: adding a domain re-checks every area (EADDRINUSE)."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)), iova=0x10001)
    expect(errno.EADDRINUSE, lambda: env.be.hwpt_alloc(dev, ioas))


# --- IOAS_UNMAP ---


def test_unmap_length_zero_is_einval(env: Env) -> None:
    """DI/io_pagetable.c:856."""
    expect(errno.EINVAL, lambda: env.be.ioas_unmap(env.be.ioas_alloc(), 0x10000, 0))


def test_unmap_wrapping_range_is_eoverflow(env: Env) -> None:
    """DI/io_pagetable.c:859: iova + length - 1 wraps."""
    ioas = env.be.ioas_alloc()
    expect(errno.EOVERFLOW, lambda: env.be.ioas_unmap(ioas, ULONG_MAX - PAGE + 1, 2 * PAGE))


def test_unmap_iova_at_ulong_max_is_eoverflow(env: Env) -> None:
    """DI/ioas.c:356."""
    expect(errno.EOVERFLOW, lambda: env.be.ioas_unmap(env.be.ioas_alloc(), ULONG_MAX, PAGE))


def test_unmap_missing_ioas_wins_over_eoverflow(env: Env) -> None:
    """DI/ioas.c:347 looks the IOAS up before DI/ioas.c:356."""
    expect(errno.ENOENT, lambda: env.be.ioas_unmap(42, ULONG_MAX, PAGE))


def test_unmap_all_of_an_empty_ioas_is_zero(env: Env) -> None:
    """DI/ioas.c:351 and DI/io_pagetable.c:945: unmap-all of nothing succeeds."""
    assert env.be.ioas_unmap(env.be.ioas_alloc(), 0, uapi.U64_MAX) == 0


def test_unmap_writes_back_the_length_unmapped(env: Env) -> None:
    """DI/ioas.c:370."""
    ioas = env.be.ioas_alloc()
    env.be.ioas_map(ioas, HostMapping(bytearray(2 * PAGE)), iova=0x10000)
    env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)), iova=0x20000)
    buf = raw_ok(env, uapi.Ioctl.IOMMU_IOAS_UNMAP, uapi.IommuIoasUnmap, ioas_id=ioas,
                 iova=0x10000, length=0x20000)
    assert uapi.IommuIoasUnmap.from_buffer_copy(buf).length == 3 * PAGE


def test_unmap_stops_at_a_straddling_mapping_after_unmapping_earlier_ones(env: Env) -> None:
    """DI/io_pagetable.c:777: areas are unmapped in order until one sticks out (ENOENT)."""
    ioas = env.be.ioas_alloc()
    env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)), iova=0x10000)
    env.be.ioas_map(ioas, HostMapping(bytearray(4 * PAGE)), iova=0x20000)
    expect(errno.ENOENT, lambda: env.be.ioas_unmap(ioas, 0x10000, 0x12000))
    expect(errno.ENOENT, lambda: env.be.ioas_unmap(ioas, 0x10000, PAGE))
    assert env.be.ioas_unmap(ioas, 0x20000, 4 * PAGE) == 4 * PAGE


# --- IOAS_IOVA_RANGES ---


def test_iova_ranges_reserved_wins_over_a_missing_ioas(env: Env) -> None:
    """DI/ioas.c:75 precedes the lookup at DI/ioas.c:78."""
    raw_err(errno.EOPNOTSUPP, env, uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES,
            uapi.IommuIoasIovaRanges, ioas_id=77, reserved=1)


def test_iova_ranges_emsgsize_still_writes_the_alignment(env: Env) -> None:
    """DI/ioas.c:87 writes out_iova_alignment before DI/ioas.c:108 says EMSGSIZE."""
    buf = raw_err(errno.EMSGSIZE, env, uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES,
                  uapi.IommuIoasIovaRanges, ioas_id=env.be.ioas_alloc(), num_iovas=0)
    assert uapi.IommuIoasIovaRanges.from_buffer_copy(buf).out_iova_alignment == 1


def test_iova_ranges_with_room_fills_the_array_and_the_count(env: Env) -> None:
    """DI/ioas.c:91-106: every hole is copied out and counted."""
    ranges = (uapi.IommuIovaRange * 8)()
    buf = raw_ok(env, uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES, uapi.IommuIoasIovaRanges,
                 ioas_id=env.be.ioas_alloc(), num_iovas=8, allowed_iovas=ctypes.addressof(ranges))
    count = uapi.IommuIoasIovaRanges.from_buffer_copy(buf).num_iovas
    assert 1 <= count <= 8
    assert all(ranges[i].start <= ranges[i].last for i in range(count))
    assert ranges[0].start == 0 and ranges[count - 1].last == ULONG_MAX


def aligned_memory(pages: int = 4) -> mmap.mmap:
    """Page-aligned user memory (an IOAS with a domain refuses a mid-page start)."""
    return mmap.mmap(-1, pages * PAGE)


MSI_BASE, MSI_LENGTH = uapi.ARM_SMMU_MSI_IOVA_BASE, uapi.ARM_SMMU_MSI_IOVA_LENGTH
S2_LAST = (1 << uapi.QEMU_SMMU_IAS_BITS) - 1
S1_LAST = (1 << uapi.ARM_SMMU_S1_INPUT_BITS) - 1


def test_a_nest_parent_reserves_beyond_its_aperture(env: Env) -> None:
    """DI/io_pagetable.c:1269 iopt_table_add_domain reserves past aperture_end, which for a
    stage-2 domain is the SMMU's IAS (arm_smmu_domain_finalise): 44 bits on QEMU."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    env.be.hwpt_alloc(dev, ioas, flags=uapi.HwptAllocFlags.NEST_PARENT)
    assert env.be.ioas_iova_ranges(ioas) == ([(0, S2_LAST)], PAGE)
    expect(errno.EINVAL, lambda: env.be.ioas_map(ioas, HostMapping(aligned_memory()),
                                                  iova=S2_LAST + 1))


def test_an_attached_device_reserves_its_msi_window(env: Env) -> None:
    """DI/device.c:487 iopt_table_enforce_dev_resv_regions: arm_smmu_get_resv_regions'
    IOMMU_RESV_SW_MSI window; a stage-1 automatic domain ends at 2^48 - 1."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    env.be.device_attach(dev, ioas)
    assert env.be.ioas_iova_ranges(ioas) == (
        [(0, MSI_BASE - 1), (MSI_BASE + MSI_LENGTH, S1_LAST)], PAGE)
    expect(errno.EINVAL, lambda: env.be.ioas_map(ioas, HostMapping(aligned_memory()),
                                                  iova=MSI_BASE))
    env.be.device_detach(dev)
    assert env.be.ioas_iova_ranges(ioas) == ([(0, ULONG_MAX)], 1)


def test_attach_over_a_mapping_in_the_msi_window_is_eaddrinuse_and_leaves_nothing(
        env: Env) -> None:
    """DI/io_pagetable.c iopt_reserve_iova refuses an area; the automatic domain made for the
    attach is destroyed again (its id is free for the next object)."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    memory = aligned_memory()
    env.be.ioas_map(ioas, HostMapping(memory, 0, PAGE), iova=MSI_BASE)
    expect(errno.EADDRINUSE, lambda: env.be.device_attach(dev, ioas))
    assert env.be.ioas_alloc() == ioas + 1


def test_a_domain_over_a_mapping_beyond_its_aperture_is_eaddrinuse(env: Env) -> None:
    """DI/io_pagetable.c:1269: iopt_reserve_iova finds the area past aperture_end."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    env.be.ioas_map(ioas, HostMapping(aligned_memory(), 0, PAGE), iova=S2_LAST + 1)
    expect(errno.EADDRINUSE,
           lambda: env.be.hwpt_alloc(dev, ioas, flags=uapi.HwptAllocFlags.NEST_PARENT))


def test_a_mid_page_user_address_is_refused_once_a_domain_exists(env: Env) -> None:
    """DI/io_pagetable.c:219 iopt_insert_area: the page offset must meet the IOAS's alignment
    (PAGE_SIZE with a domain, 1 without); DI/io_pagetable.c:1205 refuses the domain when an
    existing area has one that does not."""
    dev = env.new_device(1)
    memory = aligned_memory()
    half = PAGE // 2
    plain = env.be.ioas_alloc()
    env.be.ioas_map(plain, HostMapping(memory, half, PAGE), iova=0x10000)
    expect(errno.EADDRINUSE,
           lambda: env.be.hwpt_alloc(dev, plain, flags=uapi.HwptAllocFlags.NEST_PARENT))
    with_domain = env.be.ioas_alloc()
    env.be.hwpt_alloc(dev, with_domain, flags=uapi.HwptAllocFlags.NEST_PARENT)
    expect(errno.EINVAL, lambda: env.be.ioas_map(with_domain, HostMapping(memory, half, PAGE),
                                                  iova=0x10000))


def test_the_automatic_iova_keeps_the_user_address_page_offset(env: Env) -> None:
    """DI/io_pagetable.c:119 iopt_alloc_iova: aligned to min(roundup_pow_of_two(length), the
    address's alignment), then the page offset ORed in, from PAGE_SIZE up (never 0)."""
    ioas = env.be.ioas_alloc()
    memory = aligned_memory()
    assert env.be.ioas_map(ioas, HostMapping(memory, 0x800, 2 * PAGE)) == PAGE + 0x800
    assert env.be.ioas_map(ioas, HostMapping(memory, 0, PAGE)) == 4 * PAGE


def test_iova_ranges_copies_out_the_ranges_that_fit_before_emsgsize(env: Env) -> None:
    """DI/ioas.c:91-108: each hole is copied while num_iovas has room, all are counted."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    env.be.device_attach(dev, ioas)
    ranges = (uapi.IommuIovaRange * 1)()
    buf = raw_err(errno.EMSGSIZE, env, uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES,
                  uapi.IommuIoasIovaRanges, ioas_id=ioas, num_iovas=1,
                  allowed_iovas=ctypes.addressof(ranges))
    assert uapi.IommuIoasIovaRanges.from_buffer_copy(buf).num_iovas == 2
    assert (ranges[0].start, ranges[0].last) == (0, MSI_BASE - 1)


# --- DESTROY and ids ---


def test_destroy_id_zero_is_enoent(env: Env) -> None:
    """DI/main.c:265: id 0 holds nothing (ids come from xa_alloc, DI/main.c:56)."""
    expect(errno.ENOENT, lambda: env.be.destroy(0))


def test_destroy_a_bound_device_is_ebusy(env: Env) -> None:
    """DI/device.c:337: the binding driver holds a user of the device object."""
    dev = env.new_device(1)
    expect(errno.EBUSY, lambda: env.be.destroy(dev))


def test_ids_are_one_space_for_every_type(env: Env) -> None:
    """DI/main.c:56: one xarray hands out the ids of every object type."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    hwpt = env.be.hwpt_alloc(dev, ioas, flags=uapi.HwptAllocFlags.NEST_PARENT)
    assert (ioas, hwpt) == (dev + 1, dev + 2)


# --- HWPT_ALLOC: check order ---


def test_hwpt_reserved_wins_over_a_missing_device(env: Env) -> None:
    """DI/hw_pagetable.c:359 precedes the device lookup at :365."""
    raw_err(errno.EOPNOTSUPP, env, uapi.Ioctl.IOMMU_HWPT_ALLOC, uapi.IommuHwptAlloc,
            dev_id=99, pt_id=98, reserved=1)


def test_hwpt_data_len_without_type_wins_over_a_missing_device(env: Env) -> None:
    """DI/hw_pagetable.c:361."""
    raw_err(errno.EINVAL, env, uapi.Ioctl.IOMMU_HWPT_ALLOC, uapi.IommuHwptAlloc,
            dev_id=99, pt_id=98, data_len=16)


def test_hwpt_missing_device_wins_over_a_missing_pt(env: Env) -> None:
    """DI/hw_pagetable.c:365 (ENOENT) before :369 (a missing pt is EINVAL)."""
    raw_err(errno.ENOENT, env, uapi.Ioctl.IOMMU_HWPT_ALLOC, uapi.IommuHwptAlloc,
            dev_id=99, pt_id=98)


@pytest.mark.parametrize("pt", ["device", "vdevice"])
def test_hwpt_on_an_object_that_is_no_page_table_is_einval(env: Env, pt: str) -> None:
    """DI/hw_pagetable.c:420: neither IOAS, HWPT_PAGING nor vIOMMU."""
    n = nest(env)
    pt_id = n.dev if pt == "device" else env.be.vdevice_alloc(n.viommu, n.dev, 0x10)
    expect(errno.EINVAL, lambda: env.be.hwpt_alloc(n.dev, pt_id))


def test_hwpt_dirty_tracking_without_hardware_support_is_eopnotsupp(env: Env) -> None:
    """DI/hw_pagetable.c:139: the host SMMU has no dirty tracking (no HTTU)."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    expect(errno.EOPNOTSUPP,
           lambda: env.be.hwpt_alloc(dev, ioas, flags=uapi.HwptAllocFlags.DIRTY_TRACKING))


def test_hwpt_fault_id_with_nest_parent_is_eopnotsupp(env: Env) -> None:
    """DI/hw_pagetable.c:142."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    flags = uapi.HwptAllocFlags.NEST_PARENT | uapi.HwptAllocFlags.FAULT_ID_VALID
    expect(errno.EOPNOTSUPP, lambda: env.be.hwpt_alloc(dev, ioas, flags=flags))


@pytest.mark.parametrize("tail", [0, 1], ids=["zero_tail", "nonzero_tail"])
def test_nested_data_longer_than_the_vste_is_einval(env: Env, tail: int) -> None:
    """include/linux/iommu.h:474: src len > the kernel's struct is EINVAL, zero tail or not."""
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.hwpt_alloc(n.dev, n.viommu, data=[*vste(), tail],
                                                   data_len=24))


# --- VIOMMU_ALLOC, VDEVICE_ALLOC: check order ---


def test_viommu_flags_win_over_a_missing_device(env: Env) -> None:
    """DI/viommu.c:33 precedes the device lookup at :36."""
    raw_err(errno.EOPNOTSUPP, env, uapi.Ioctl.IOMMU_VIOMMU_ALLOC, uapi.IommuViommuAlloc,
            flags=1, type=uapi.ViommuType.ARM_SMMUV3, dev_id=99, hwpt_id=98)


@pytest.mark.parametrize("target", ["ioas", "nested"])
def test_viommu_on_no_paging_hwpt_is_enoent(env: Env, target: str) -> None:
    """DI/viommu.c:66: iommufd_get_hwpt_paging finds no HWPT_PAGING by that id."""
    n = nest(env)
    pt = n.ioas if target == "ioas" else env.be.hwpt_alloc(n.dev, n.viommu,
                                                           data=vste(SteConfig.ABORT))
    expect(errno.ENOENT, lambda: env.be.viommu_alloc(n.dev, pt))


def test_two_viommus_may_share_a_nest_parent(env: Env) -> None:
    """DI/viommu.c:66-80: nothing makes a nest parent exclusive to one vIOMMU."""
    n = nest(env)
    assert env.be.viommu_alloc(n.dev, n.s2) > n.viommu


def test_vdevice_on_an_ioas_is_enoent(env: Env) -> None:
    """DI/viommu.c:164: iommufd_get_viommu finds no vIOMMU by that id."""
    n = nest(env)
    expect(errno.ENOENT, lambda: env.be.vdevice_alloc(n.ioas, n.dev, 0x10))


# --- HWPT_INVALIDATE: core checks and written-back entry_num ---


def invalidate_args(hwpt: int, array: ctypes.Array[ctypes.c_uint64] | None,
                    **values: int) -> dict[str, int]:
    args = {"hwpt_id": hwpt, "data_uptr": ctypes.addressof(array) if array is not None else 0,
            "data_type": uapi.HwptInvalidateDataType.ARM_SMMUV3, "entry_len": 16,
            "entry_num": 1}
    args.update(values)
    return args


def test_invalidate_reserved_is_eopnotsupp_with_nothing_handled(env: Env) -> None:
    """DI/hw_pagetable.c:521 and the write-back of entry_num 0 at :573."""
    n = nest(env)
    array = (ctypes.c_uint64 * 2)(*cmd(CmdOpcode.TLBI_NH_ALL))
    buf = raw_err(errno.EOPNOTSUPP, env, uapi.Ioctl.IOMMU_HWPT_INVALIDATE,
                  uapi.IommuHwptInvalidate, **invalidate_args(n.viommu, array, reserved=1))
    assert uapi.IommuHwptInvalidate.from_buffer_copy(buf).entry_num == 0


@pytest.mark.parametrize(("field", "value"), [
    ("data_uptr", 0), ("entry_len", PAGE + 16), ("entry_num", INVALIDATE_ENTRY_NUM_MAX + 1),
], ids=["null_array", "entry_beyond_a_page", "too_many_entries"])
def test_invalidate_bounds_are_einval(env: Env, field: str, value: int) -> None:
    """DI/hw_pagetable.c:529-532."""
    n = nest(env)
    array = (ctypes.c_uint64 * 2)(*cmd(CmdOpcode.TLBI_NH_ALL))
    buf = raw_err(errno.EINVAL, env, uapi.Ioctl.IOMMU_HWPT_INVALIDATE, uapi.IommuHwptInvalidate,
                  **invalidate_args(n.viommu, array, **{field: value}))
    assert uapi.IommuHwptInvalidate.from_buffer_copy(buf).entry_num == 0


def test_invalidate_bounds_win_over_a_missing_hwpt(env: Env) -> None:
    """DI/hw_pagetable.c:529 precedes the lookup at :537."""
    raw_err(errno.EINVAL, env, uapi.Ioctl.IOMMU_HWPT_INVALIDATE, uapi.IommuHwptInvalidate,
            **invalidate_args(99, None))


def test_invalidate_an_ioas_is_einval(env: Env) -> None:
    """DI/hw_pagetable.c:563: only nested HWPTs and vIOMMUs take invalidations."""
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.hwpt_invalidate(n.ioas, [cmd(CmdOpcode.TLBI_NH_ALL)]))


def test_short_invalidation_entries_are_zero_extended(env: Env) -> None:
    """include/linux/iommu.h:583: an 8-byte entry is the command's first word, rest zero."""
    n = nest(env)
    assert env.be.hwpt_invalidate(n.viommu, [cmd(CmdOpcode.TLBI_NH_ALL)] * 3, entry_len=8) == 3


# --- HWPT_INVALIDATE: the ARM command checks (AS:344-425) on QEMU's SMMUv3 ---
# The host SMMU (QEMU 11.1.3): 16-bit ASIDs, RANGE_INV, no DS, no ATS, no substreams.

VALID_COMMANDS = [
    ("nh_va_tg4k_ttl3", cmd(CmdOpcode.TLBI_NH_VA, ASID=1, TG=1, TTL=3, VA=0x1000)),
    ("nh_va_range_no_ttl", cmd(CmdOpcode.TLBI_NH_VA, ASID=1, TG=1, NUM=3, VA=0x4000)),
    ("nh_vaa_leaf", cmd(CmdOpcode.TLBI_NH_VAA, LEAF=1, VA=0x2000)),
    ("nh_asid_16bit", cmd(CmdOpcode.TLBI_NH_ASID, ASID=0xFFFF)),
    ("cfgi_cd_leaf", cmd(CmdOpcode.CFGI_CD, SID=0x10, LEAF=1)),
]


@pytest.mark.parametrize("entry", [c[1] for c in VALID_COMMANDS],
                         ids=[c[0] for c in VALID_COMMANDS])
def test_command_with_only_allowed_fields_is_handled(env: Env, entry: tuple[int, int]) -> None:
    """AS:344-425: each field here is in the opcode's allowed set."""
    n = nest(env)
    env.be.vdevice_alloc(n.viommu, n.dev, 0x10)
    assert env.be.hwpt_invalidate(n.viommu, [entry]) == 1


INVALID_COMMANDS = [
    ("nsnh_all_with_vmid", cmd(CmdOpcode.TLBI_NSNH_ALL, VMID=1)),  # AS:351
    ("nh_all_with_asid", cmd(CmdOpcode.TLBI_NH_ALL, ASID=1)),  # AS:378
    ("nh_asid_with_address", cmd(CmdOpcode.TLBI_NH_ASID, ASID=1, VA=0x1000)),  # AS:373
    ("nh_va_ttl_without_tg", cmd(CmdOpcode.TLBI_NH_VA, TTL=1)),  # AS:334
    ("nh_va_num_without_tg", cmd(CmdOpcode.TLBI_NH_VA, NUM=1)),  # AS:334
    ("nh_va_tg_without_range_or_ttl", cmd(CmdOpcode.TLBI_NH_VA, TG=1)),  # AS:340
    ("nh_va_16k_ttl1_without_ds", cmd(CmdOpcode.TLBI_NH_VA, TG=2, TTL=1)),  # AS:337
    # SCALE[5] (word 0 bit 25, arm-smmu-v3.h:421; vsmmu.arch declares SCALE[4:0] only).
    ("nh_vaa_scale_above_31_without_ds",
     (cmd(CmdOpcode.TLBI_NH_VAA, TG=1, TTL=3)[0] | 1 << 25, cmd(CmdOpcode.TLBI_NH_VAA,
                                                             TG=1, TTL=3)[1])),  # AS:366
    ("nh_va_ssec", cmd(CmdOpcode.TLBI_NH_VA, SSEC=1)),  # AS:421
    ("cfgi_cd_ssid_without_substreams", cmd(CmdOpcode.CFGI_CD, SID=0x10, SSID=1)),  # AS:400
    ("cfgi_cd_all_leaf", cmd(CmdOpcode.CFGI_CD_ALL, SID=0x10, LEAF=1)),  # AS:404
    ("atc_inv_without_ats", cmd(CmdOpcode.ATC_INV, SID=0x10)),  # AS:383
]


@pytest.mark.parametrize("entry", [c[1] for c in INVALID_COMMANDS],
                         ids=[c[0] for c in INVALID_COMMANDS])
def test_command_with_a_disallowed_field_is_eio(env: Env, entry: tuple[int, int]) -> None:
    """AS:421 (and the opcode's own check): EIO at the entry's index, nothing after it."""
    n = nest(env)
    env.be.vdevice_alloc(n.viommu, n.dev, 0x10)
    entries = [cmd(CmdOpcode.TLBI_NH_ALL), entry, cmd(CmdOpcode.TLBI_NH_ALL)]
    exc = expect(errno.EIO, lambda: env.be.hwpt_invalidate(n.viommu, entries))
    assert exc.handled == 1


# --- VEVENTQ_ALLOC and its fd ---


def test_veventq_depth_beyond_the_limit_is_einval(env: Env) -> None:
    """DI/eventq.c:517 with VEVENTQ_MAX_DEPTH (DI/eventq.c:504)."""
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.veventq_alloc(n.viommu, VEVENTQ_MAX_DEPTH + 1))


def test_veventq_depth_at_the_limit_is_accepted(env: Env) -> None:
    """DI/eventq.c:517."""
    n = nest(env)
    q = env.be.veventq_alloc(n.viommu, VEVENTQ_MAX_DEPTH)
    os.close(q.fd)


def test_veventq_reserved_is_eopnotsupp(env: Env) -> None:
    """DI/eventq.c:514."""
    n = nest(env)
    raw_err(errno.EOPNOTSUPP, env, uapi.Ioctl.IOMMU_VEVENTQ_ALLOC, uapi.IommuVeventqAlloc,
            viommu_id=n.viommu, type=uapi.VeventqType.ARM_SMMUV3, veventq_depth=2, reserved=1)


def test_veventq_flags_win_over_depth_zero(env: Env) -> None:
    """DI/eventq.c:514 precedes :517."""
    n = nest(env)
    expect(errno.EOPNOTSUPP, lambda: env.be.veventq_alloc(n.viommu, 0, flags=1))


def test_veventq_depth_zero_wins_over_a_missing_viommu(env: Env) -> None:
    """DI/eventq.c:517 precedes the lookup at :520."""
    expect(errno.EINVAL, lambda: env.be.veventq_alloc(99, 0))


def test_veventq_read_shorter_than_a_header_is_einval(env: Env) -> None:
    """DI/eventq.c:324, even on an empty queue."""
    n = nest(env)
    q = env.be.veventq_alloc(n.viommu, 2)
    try:
        expect(errno.EINVAL,
               lambda: env.be.veventq_read(q.fd, ctypes.sizeof(uapi.IommufdVeventHeader) - 1))
    finally:
        os.close(q.fd)


def test_veventq_read_of_an_empty_queue_returns_nothing(env: Env) -> None:
    """DI/eventq.c:327-374: the loop finds no event, so read() returns 0 bytes, no error
    (and twice in a row: an empty queue is not end of file)."""
    n = nest(env)
    q = env.be.veventq_alloc(n.viommu, 2)
    try:
        assert env.be.veventq_read(q.fd, 4096) == b""
        assert env.be.veventq_read(q.fd, 4096) == b""
        assert env.be.veventq_read(q.fd, ctypes.sizeof(uapi.IommufdVeventHeader)) == b""
    finally:
        os.close(q.fd)


def test_unbinding_a_device_tombstones_its_vdevice_id(env: Env) -> None:
    """DI/device.c:166-195 iommufd_device_remove_vdev: a vDEVICE still alive when its device
    is unbound is destroyed and leaves a tombstone (DI/main.c:278): its id is never handed
    out again and DESTROY of it is ENOENT; the device's own id is free again."""
    n = nest(env)
    other = env.new_device(2)
    vdev = env.be.vdevice_alloc(n.viommu, other, 0x22)
    env.unbind(other)
    assert [env.be.ioas_alloc() for _ in range(2)] == [other, vdev + 1]
    expect(errno.ENOENT, lambda: env.be.destroy(vdev))
    env.be.destroy(n.viommu)  # the vDEVICE's hold on the vIOMMU went with it


def test_a_viommu_takes_one_veventq_of_each_type(env: Env) -> None:
    """DI/eventq.c:520-530: EEXIST only for a second queue of the same type; any type but
    DEFAULT is accepted (the driver never reports to the others)."""
    n = nest(env)
    arm = env.be.veventq_alloc(n.viommu, 2)
    other = env.be.veventq_alloc(n.viommu, 2, type_=uapi.VeventqType.TEGRA241_CMDQV)
    expect(errno.EEXIST, lambda: env.be.veventq_alloc(n.viommu, 2))
    os.close(arm.fd)
    os.close(other.fd)


def test_viommu_reserved_is_not_checked(env: Env) -> None:
    """DI/viommu.c:33 checks flags and type only; __reserved is never read."""
    n = nest(env)
    buf = raw_ok(env, uapi.Ioctl.IOMMU_VIOMMU_ALLOC, uapi.IommuViommuAlloc,
                 type=uapi.ViommuType.ARM_SMMUV3, dev_id=env.new_device(2), hwpt_id=n.s2,
                 reserved=1)
    assert uapi.IommuViommuAlloc.from_buffer_copy(buf).out_viommu_id > n.viommu


def test_destroy_veventq_while_its_fd_is_open_is_ebusy(env: Env) -> None:
    """DI/eventq.c:435: the fd holds a user of the object; DI/main.c:273 refuses."""
    n = nest(env)
    q = env.be.veventq_alloc(n.viommu, 2)
    expect(errno.EBUSY, lambda: env.be.destroy(q.id))
    os.close(q.fd)
    env.be.destroy(q.id)
    env.be.destroy(n.viommu)


# --- the vEVENTQ fed by real faults: the device DMAs through a stage 1 with nothing mapped ---

FAULT_IPA = 0x4000_0000
"""Where the CD (and, a page up, its empty level-0 table) sits in the IOAS."""
FAULT_IOVA = 0x1234_5000
FAULT_VSID = 0x21
HEADER = uapi.VEVENT_HEADER_SIZE
RECORD = HEADER + uapi.VEVENT_ARM_SMMUV3_SIZE
LOST = uapi.VeventqFlag.LOST_EVENTS


@dataclass
class Faulting:
    """A device attached to a nested HWPT whose stage 1 maps nothing, and its vEVENTQ."""

    dev: int
    queue: int
    fd: int
    memory: mmap.mmap


def faulting(env: Env, depth: int) -> Faulting:
    n = nest(env)
    memory = mmap.mmap(-1, 2 * PAGE)
    # A 48-bit, 4 KiB-granule CD whose faults are recorded (R=1), with an all-invalid table.
    cd = Cd(v=1, aa64=1, t0sz=16, tg0=Tg0.GRANULE_4K, epd1=1, ips=5, affd=1, r=1, a=1, aset=1,
            asid=1, ttb0=FAULT_IPA + PAGE).encode()
    memory[:len(cd)] = cd
    env.be.ioas_map(n.ioas, HostMapping(memory), iova=FAULT_IPA)
    env.be.vdevice_alloc(n.viommu, n.dev, FAULT_VSID)
    q = env.be.veventq_alloc(n.viommu, depth)
    env.be.device_attach(n.dev, env.be.hwpt_alloc(n.dev, n.viommu, data=vste(ptr=FAULT_IPA)))
    return Faulting(n.dev, q.id, q.fd, memory)


def fault(env: Env, f: Faulting, times: int = 1) -> None:
    for index in range(times):
        assert not env.dma(f.dev, FAULT_IOVA + index * PAGE), "the DMA was not refused"
    env.settle()


F_TRANSLATION_ID = 0x10
CLASS_IN = 0b10
"""IHI 0070 §7.3: CLASS (event dword 1 bits 41:40) = IN, the input address faulted."""


def f_translation_of_a_write(address: int) -> bytes:
    """The whole record IHI 0070 §7.3.12 gives a stage-1 F_TRANSLATION of a write at
    ``address``, with the vSID the kernel puts in (arm_vmaster_report_event): RnW=0, S2=0,
    no substream, no stall, IPA not valid."""
    words = (F_TRANSLATION_ID | FAULT_VSID << 32, CLASS_IN << 40, address, 0)
    return b"".join(w.to_bytes(8, "little") for w in words)


def records(data: bytes) -> list[tuple[int, int, int | None]]:
    """(flags, sequence, input address) of each record, walked by the uapi's sizes; every
    event must be, byte for byte, the F_TRANSLATION of a write at its input address."""
    out: list[tuple[int, int, int | None]] = []
    offset = 0
    while offset < len(data):
        header = uapi.IommufdVeventHeader.from_buffer_copy(data, offset)
        offset += HEADER
        address = None
        if not header.flags & LOST:
            raw = data[offset:offset + uapi.VEVENT_ARM_SMMUV3_SIZE]
            address = int.from_bytes(raw[16:24], "little")  # dword 2: InputAddr
            assert raw == f_translation_of_a_write(address), raw.hex()
            offset += uapi.VEVENT_ARM_SMMUV3_SIZE
        out.append((header.flags, header.sequence, address))
    assert offset == len(data)
    return out


def iova(index: int) -> int:
    return FAULT_IOVA + index * PAGE


def test_veventq_one_read_returns_every_fault_with_the_virtual_sid(env: Env) -> None:
    """DI/eventq.c:327 loops while records fit; arm-smmu-v3-iommufd.c arm_vmaster_report_event
    puts the vSID in the event."""
    f = faulting(env, 4)
    fault(env, f, 3)
    assert records(env.be.veventq_read(f.fd, 4096)) == [(0, 0, iova(0)), (0, 1, iova(1)),
                                                        (0, 2, iova(2))]
    assert env.be.veventq_read(f.fd, 4096) == b""


def test_veventq_read_stops_at_the_last_whole_record_that_fits(env: Env) -> None:
    """DI/eventq.c:344: a record that does not fit after others stays queued."""
    f = faulting(env, 4)
    fault(env, f, 2)
    assert records(env.be.veventq_read(f.fd, RECORD + HEADER)) == [(0, 0, iova(0))]
    assert records(env.be.veventq_read(f.fd, 4096)) == [(0, 1, iova(1))]


def test_veventq_read_too_short_for_the_first_event_is_einval_and_keeps_it(env: Env) -> None:
    """DI/eventq.c:344-349: restored, and -EINVAL as nothing was copied."""
    f = faulting(env, 4)
    fault(env, f)
    expect(errno.EINVAL, lambda: env.be.veventq_read(f.fd, RECORD - 1))
    assert records(env.be.veventq_read(f.fd, RECORD)) == [(0, 0, iova(0))]


def test_veventq_overflow_numbers_every_lost_event(env: Env) -> None:
    """DI/driver.c:162 drops an event at a full queue; iommufd_vevent_handler re-appends the
    one LOST_EVENTS header with the next sequence number each time."""
    f = faulting(env, 2)
    fault(env, f, 5)
    assert records(env.be.veventq_read(f.fd, 4096)) == [(0, 0, iova(0)), (0, 1, iova(1)),
                                                        (LOST, 4, None)]
    fault(env, f)  # drained: the next fault is queued, its number after the losses
    assert records(env.be.veventq_read(f.fd, 4096)) == [(0, 5, iova(0))]


def test_veventq_event_after_room_replaces_the_unread_lost_header(env: Env) -> None:
    """iommufd_vevent_handler (DI/iommufd_private.h) deletes the LOST_EVENTS header when it is
    last and another record arrives: the gap in sequence numbers tells of the loss."""
    f = faulting(env, 2)
    fault(env, f, 3)
    assert records(env.be.veventq_read(f.fd, RECORD)) == [(0, 0, iova(0))]
    fault(env, f)
    assert records(env.be.veventq_read(f.fd, 4096)) == [(0, 1, iova(1)), (0, 3, iova(0))]


# --- GET_HW_INFO: flags, reserved and the written-back data_len ---


def hw_info_args(dev: int, buf: ctypes.Array[ctypes.c_char], **values: int) -> dict[str, int]:
    args = {"dev_id": dev, "data_len": len(buf), "data_uptr": ctypes.addressof(buf)}
    args.update(values)
    return args


ARM_INFO_SIZE = ctypes.sizeof(uapi.IommuHwInfoArmSmmuv3)


def test_hw_info_unknown_flag_wins_over_a_missing_device(env: Env) -> None:
    """DI/device.c:1641 precedes the device lookup at :1650."""
    out = user_buffer(ARM_INFO_SIZE)
    raw_err(errno.EOPNOTSUPP, env, uapi.Ioctl.IOMMU_GET_HW_INFO, uapi.IommuHwInfo,
            **hw_info_args(99, out, flags=2))


def test_hw_info_type_without_the_input_flag_is_ignored(env: Env) -> None:
    """DI/device.c:1648: in_data_type is cleared unless IOMMU_HW_INFO_FLAG_INPUT_TYPE."""
    out = user_buffer(ARM_INFO_SIZE)
    buf = raw_ok(env, uapi.Ioctl.IOMMU_GET_HW_INFO, uapi.IommuHwInfo,
                 **hw_info_args(env.new_device(1), out, out_data_type=uapi.HwInfoType.INTEL_VTD))
    assert uapi.IommuHwInfo.from_buffer_copy(buf).out_data_type == uapi.HwInfoType.ARM_SMMUV3


def test_hw_info_short_buffer_gets_a_prefix_and_the_kernel_length(env: Env) -> None:
    """DI/device.c:1682 copies min(user, kernel); :1703 writes back the kernel's length."""
    out = user_buffer(8, fill=0xAA)
    buf = raw_ok(env, uapi.Ioctl.IOMMU_GET_HW_INFO, uapi.IommuHwInfo,
                 **hw_info_args(env.new_device(1), out))
    assert uapi.IommuHwInfo.from_buffer_copy(buf).data_len == ARM_INFO_SIZE
    assert bytes(out.raw) != bytes([0xAA]) * 8


def test_hw_info_long_buffer_tail_is_zeroed(env: Env) -> None:
    """DI/device.c:1693: the bytes past the kernel's data are cleared."""
    out = user_buffer(ARM_INFO_SIZE + 24, fill=0xAA)
    buf = raw_ok(env, uapi.Ioctl.IOMMU_GET_HW_INFO, uapi.IommuHwInfo,
                 **hw_info_args(env.new_device(1), out))
    assert uapi.IommuHwInfo.from_buffer_copy(buf).data_len == ARM_INFO_SIZE
    assert out.raw[ARM_INFO_SIZE:] == bytes(24)


def test_hw_info_reports_that_ats_cannot_be_used(env: Env) -> None:
    """DI/device.c:1711: PCI_ATS_NOT_SUPPORTED when the device/SMMU pair has no ATS."""
    out = user_buffer(ARM_INFO_SIZE)
    buf = raw_ok(env, uapi.Ioctl.IOMMU_GET_HW_INFO, uapi.IommuHwInfo,
                 **hw_info_args(env.new_device(1), out))
    info = uapi.IommuHwInfo.from_buffer_copy(buf)
    assert info.out_capabilities & uapi.HwCapabilities.PCI_ATS_NOT_SUPPORTED
    assert info.out_max_pasid_log2 == 0


# --- attach and detach (drivers/vfio/iommufd.c) ---


def test_attach_to_an_object_of_another_kind_is_einval(env: Env) -> None:
    """DI/device.c iommufd_device_change_pt looks the id up as any type (ENOENT if absent)
    and refuses a vIOMMU, vDEVICE or device with EINVAL."""
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.device_attach(n.dev, n.viommu))
    expect(errno.EINVAL, lambda: env.be.device_attach(n.dev, n.dev))
    expect(errno.ENOENT, lambda: env.be.device_attach(n.dev, 99))


def test_attach_to_an_ioas_returns_its_automatic_hwpt(env: Env) -> None:
    """drivers/vfio/device_cdev.c copies pt_id back: the HWPT attached, made for the IOAS."""
    dev = env.new_device(1)
    ioas = env.be.ioas_alloc()
    hwpt = env.be.device_attach(dev, ioas)
    assert hwpt == ioas + 1
    expect(errno.EBUSY, lambda: env.be.destroy(hwpt))  # the attached device holds it
    assert env.be.ioas_alloc() == hwpt + 1


def test_detach_of_a_never_attached_device_is_a_no_op(env: Env) -> None:
    """drivers/vfio/iommufd.c:181: nothing attached, nothing to do, no error."""
    dev = env.new_device(1)
    env.be.device_detach(dev)
    ioas = env.be.ioas_alloc()
    env.be.device_attach(dev, ioas)
    env.be.device_detach(dev)
    env.be.destroy(ioas)
