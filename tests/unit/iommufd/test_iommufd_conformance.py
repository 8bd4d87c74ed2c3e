"""Conformance of the iommufd backends with the kernel's errno rules.

Drawn from tools/testing/selftests/iommu/iommufd.c and the kernel sources
(drivers/iommu/iommufd/*.c, arm-smmu-v3-iommufd.c).  Every case runs on each
backend; the kernel backend is skipped where /dev/iommu is absent.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from vsmmu.arch.commands import CMD, CmdOpcode
from vsmmu.arch.ste import STE, Eats, SteConfig
from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import HostMapping, IommufdBackend, IommufdError, ObjType
from vsmmu.iommufd.kernel import DEV_IOMMU, KernelIommufd
from vsmmu.iommufd.sim import HostPersonality, SimIommufd

PAGE = 4096
CDEVS_VAR = "VSMMU_VFIO_CDEVS"


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
    closers: list[Callable[[], None]] = field(default_factory=list)

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
            self.sim.device_attach(self.devices[fd], arg.pt_id)
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


def make_env(kind: str, personality: HostPersonality | None = None) -> Env:
    if kind == "sim":
        sim = SimIommufd(personality)
        return Env(sim, lambda sid: sim.create_mock_device(sid), sim.ioctl)
    if kind == "sim-ioctl":
        # The whole suite through the raw path: KernelIommufd's structures into SimIommufd.ioctl.
        router = SimBehindIoctls(SimIommufd(personality))
        via = KernelIommufd(fd=os.open(os.devnull, os.O_RDWR), ioctl_fn=router)

        def bind(sid: int) -> int:
            router.next_sid = sid
            return via.bind_vfio_cdev(os.devnull)

        return Env(via, bind, router.sim.ioctl, [router.sim.close])
    reason = kernel_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    kern = KernelIommufd()
    cdevs = [c for c in os.environ[CDEVS_VAR].split(",") if c]

    def new_device(sid: int) -> int:
        # The physical StreamID is the hardware's; ``sid`` only matters to the sim.
        del sid
        if not cdevs:
            pytest.skip(f"${CDEVS_VAR}: this case needs more cdevs than were listed")
        return kern.bind_vfio_cdev(cdevs.pop(0))

    def raw(request: int, buf: bytearray) -> None:
        fcntl.ioctl(kern.fd, request, buf, True)

    return Env(kern, new_device, raw)


@pytest.fixture(params=["sim", "sim-ioctl", "kernel"])
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    e = make_env(request.param)
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
    for obj in (h, q.id, vdev, n.viommu, n.s2, n.ioas):
        env.be.destroy(obj)
    os.close(q.fd)
    assert [o.type for o in env.be.objects()] == [ObjType.DEVICE]


# --- IOAS map/unmap ---


def test_map_fixed_iova_returns_it(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    assert env.be.ioas_map(ioas, HostMapping(bytearray(2 * PAGE)), iova=0x10000) == 0x10000


def test_map_overlap_is_eexist(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    env.be.ioas_map(ioas, HostMapping(bytearray(2 * PAGE)), iova=0x10000)
    expect(errno.EEXIST, lambda: env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)), iova=0x11000))


def test_map_unaligned_iova_is_einval(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    expect(errno.EINVAL, lambda: env.be.ioas_map(ioas, HostMapping(bytearray(PAGE)), iova=0x10001))


def test_map_unaligned_length_is_einval(env: Env) -> None:
    ioas = env.be.ioas_alloc()
    expect(errno.EINVAL, lambda: env.be.ioas_map(ioas, HostMapping(bytearray(100)), iova=0x10000))


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


def test_nested_long_data_with_nonzero_tail_is_e2big(env: Env) -> None:
    n = nest(env)
    data = [*vste(), 1]
    expect(errno.E2BIG, lambda: env.be.hwpt_alloc(n.dev, n.viommu, data=data, data_len=24))


def test_nested_long_data_with_zero_tail_is_accepted(env: Env) -> None:
    n = nest(env)
    assert env.be.hwpt_alloc(n.dev, n.viommu, data=[*vste(), 0], data_len=24) > 0


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


def test_detach_unattached_is_einval(env: Env) -> None:
    n = nest(env)
    expect(errno.EINVAL, lambda: env.be.device_detach(n.dev))


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
    cmd(CmdOpcode.ATC_INV, SID=0x10),
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


def test_veventq_fd_is_nonblocking_and_empty(env: Env) -> None:
    n = nest(env)
    q = env.be.veventq_alloc(n.viommu, 2)
    with pytest.raises(BlockingIOError):
        os.read(q.fd, 4096)
    os.close(q.fd)


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
