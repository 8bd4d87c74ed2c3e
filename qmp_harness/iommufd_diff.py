"""Random iommufd ioctl sequences, run on one backend, every outcome recorded.

The kernel is the reference for iommufd; the conformance suite checks the
cases someone thought of, this checks the ones nobody did.  A seed decides
everything: each sequence opens a fresh iommufd, binds two devices, and
issues ``ops`` raw ioctls whose fields are drawn near the edges the kernel
checks (ids that exist and ids that do not, reserved fields, flags, sizes
below, at and above the structure, data lengths, vSTE and command bits,
IOVA alignment and overlaps, queue depths).  An outcome is the errno and
the structure as the ioctl left it, with process-local values (pointers,
fds) masked, plus what it wrote through its pointers.  Run with the same
seed on the sim here and on the kernel in the host lane, the two records
must be equal; ``tests/host_lane/test_iommufd_differential.py`` does that.

``python -m qmp_harness.iommufd_diff --backend kernel --seed 1 --sequences 50``
prints the record as JSON (``--backend sim`` runs the sim; the kernel backend
needs ``/dev/iommu`` and ``$VSMMU_VFIO_CDEVS`` naming at least two cdevs, as in
the host lane); ``--compare FILE`` runs and compares with a saved record instead,
printing the first divergence of each sequence.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import json
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vsmmu.arch.commands import CMD, CmdOpcode
from vsmmu.arch.ste import STE, SteConfig
from vsmmu.iommufd import uapi
from vsmmu.iommufd.kernel import KernelIommufd
from vsmmu.iommufd.sim import QEMU_SMMUV3, SimIommufd

PAGE = 4096
MEMORY_PAGES = 16
"""Each sequence's user memory: IOAS maps take their user_va inside it."""
DATA_BYTES = 256
"""Each op's data buffer (vSTE, invalidation array, HW info, IOVA ranges)."""
DEVICES = 2
CDEVS_VAR = "VSMMU_VFIO_CDEVS"
OUTCOME_OK = 0
S1_CONTEXT_IPA = 0x4000_0000

POINTER_FIELDS = frozenset({"user_va", "data_uptr", "allowed_iovas"})
"""Addresses in the caller's process: equal by construction, masked in the record."""
FD_FIELDS = frozenset({"out_veventq_fd"})


# --- the target: one backend behind raw ioctls --------------------------------


class Target:
    """A fresh iommufd with DEVICES bound devices, driven by raw ioctls."""

    devices: list[int]

    def ioctl(self, request: int, buf: bytearray) -> None:
        """One /dev/iommu ioctl (raises OSError with the errno)."""
        raise NotImplementedError

    def attach(self, index: int, pt_id: int) -> int:
        """VFIO_DEVICE_ATTACH_IOMMUFD_PT of device ``index``; the pt_id written back."""
        raise NotImplementedError

    def detach(self, index: int) -> None:
        """VFIO_DEVICE_DETACH_IOMMUFD_PT of device ``index``."""
        raise NotImplementedError

    def rebind(self, index: int) -> int:
        """Unbind device ``index`` (close its cdev) and bind it again; its new dev_id."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the iommufd and the devices."""


class SimTarget(Target):
    """The sim, as QEMU's SMMUv3 under the lane's kernel (``QEMU_SMMUV3``)."""

    def __init__(self) -> None:
        self.sim = SimIommufd(QEMU_SMMUV3)
        self.devices = [self.sim.create_mock_device(0x10 + i) for i in range(DEVICES)]

    def ioctl(self, request: int, buf: bytearray) -> None:
        self.sim.ioctl(request, buf)

    def attach(self, index: int, pt_id: int) -> int:
        return self.sim.device_attach(self.devices[index], pt_id)

    def detach(self, index: int) -> None:
        self.sim.device_detach(self.devices[index])

    def rebind(self, index: int) -> int:
        self.sim.destroy_mock_device(self.devices[index])
        self.devices[index] = self.sim.create_mock_device(0x10 + index)
        return self.devices[index]

    def close(self) -> None:
        self.sim.close()


class KernelTarget(Target):
    """``/dev/iommu`` and the VFIO cdevs named by ``$VSMMU_VFIO_CDEVS``."""

    def __init__(self, cdevs: list[str]) -> None:
        self.kern = KernelIommufd()
        self.cdevs = cdevs[:DEVICES]
        self.devices = [self.kern.bind_vfio_cdev(c) for c in self.cdevs]

    def ioctl(self, request: int, buf: bytearray) -> None:
        fcntl.ioctl(self.kern.fd, request, buf, True)

    def attach(self, index: int, pt_id: int) -> int:
        arg = uapi.VfioDeviceAttachIommufdPt.sized()
        arg.pt_id = pt_id
        fcntl.ioctl(self.kern.cdev_fd(self.devices[index]),
                    uapi.Ioctl.VFIO_DEVICE_ATTACH_IOMMUFD_PT, arg, True)
        return int(arg.pt_id)

    def detach(self, index: int) -> None:
        arg = uapi.VfioDeviceDetachIommufdPt.sized()
        fcntl.ioctl(self.kern.cdev_fd(self.devices[index]),
                    uapi.Ioctl.VFIO_DEVICE_DETACH_IOMMUFD_PT, arg, True)

    def rebind(self, index: int) -> int:
        self.kern.unbind_vfio_cdev(self.devices[index])
        self.devices[index] = self.kern.bind_vfio_cdev(self.cdevs[index])
        return self.devices[index]

    def close(self) -> None:
        self.kern.close()


def make_target(backend: str) -> Target:
    """``sim`` or ``kernel``."""
    if backend == "sim":
        return SimTarget()
    cdevs = [c for c in os.environ.get(CDEVS_VAR, "").split(",") if c]
    if len(cdevs) < DEVICES:
        raise SystemExit(f"${CDEVS_VAR} must name at least {DEVICES} VFIO cdevs")
    return KernelTarget(cdevs)


# --- drawing one operation ------------------------------------------------------


@dataclass
class Op:
    """One ioctl: its name, its fields, how its size and buffers are laid out."""

    name: str
    fields: dict[str, int] = field(default_factory=dict)
    size_delta: int = 0
    """Added to the structure's size (negative: truncated; positive: a tail)."""
    tail_byte: int = 0
    """The value of the tail's bytes when ``size_delta`` > 0."""
    data: bytes = b""
    """What the op's data pointer points at (zero-filled up to DATA_BYTES)."""
    user_page: int = 0
    """IOAS_MAP: the user_va's offset in the sequence's memory, in bytes."""


class Draw:
    """The field values of one sequence, drawn near the edges the kernel checks."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def pick(self, *choices: Any) -> Any:
        return self.rng.choice(choices)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def obj_id(self, likely: int = 0) -> int:
        """Often ``likely`` (the prologue's object of the kind the field names), mostly an id
        that may exist (ids start at 1, freed ids are reused), rarely one that cannot."""
        if likely and self.chance(0.4):
            return likely
        if self.chance(0.9):
            return self.rng.randrange(1, 11)
        return self.rng.choice((0, 99, 0xFFFF_FFFF))

    def dev_id(self, target_devices: int) -> int:
        del target_devices
        return self.rng.choice((1, 2, 3, 0, 7, 99))

    def flags(self, known: int) -> int:
        if self.chance(0.8):
            return self.rng.choice((0, known)) if known else 0
        return 1 << self.rng.randrange(32)

    def size_delta(self) -> tuple[int, int]:
        roll = self.rng.random()
        if roll < 0.85:
            return 0, 0
        if roll < 0.92:
            return -self.rng.choice((4, 8)), 0
        return self.rng.choice((4, 8, 16)), self.rng.choice((0, 0, 1))

    def iova(self) -> int:
        return self.rng.choice((0, PAGE, 0x10000, 0x11000, 0x10800, 0x4000_0000,
                                0x1_0000_0000, 1 << 47, (1 << 48) - PAGE, 1 << 63))

    def length(self) -> int:
        return self.rng.choice((0, 1, PAGE - 1, PAGE, 2 * PAGE, 3 * PAGE, 4 * PAGE,
                                MEMORY_PAGES * PAGE))

    def reserved(self) -> int:
        return 0 if self.chance(0.9) else self.rng.choice((1, 0x100))

    def vste(self) -> bytes:
        cfg = self.pick(SteConfig.ABORT, SteConfig.BYPASS, SteConfig.S1_TRANS, SteConfig.S1_TRANS,
                        SteConfig.S2_TRANS, SteConfig.NESTED, 1)
        w0 = STE.V.put(0, 0 if self.chance(0.1) else 1)
        w0 = STE.CONFIG.put(w0, cfg)
        if cfg == SteConfig.S1_TRANS:
            w0 = STE.S1CONTEXTPTR.put(w0, S1_CONTEXT_IPA)
        return self.words(w0, 0, stray=0.4)

    def words(self, w0: int, w1: int, stray: float) -> bytes:
        """``w0``, ``w1`` as the kernel reads them, one random bit set in either with
        probability ``stray`` (a field the kernel may refuse)."""
        if self.chance(stray):
            bit = 1 << self.rng.randrange(64)
            if self.rng.randrange(2):
                w1 |= bit
            else:
                w0 |= bit
        return w0.to_bytes(8, "little") + w1.to_bytes(8, "little")

    def command(self) -> bytes:
        opcode = self.pick(CmdOpcode.TLBI_NH_ALL, CmdOpcode.TLBI_NH_ASID, CmdOpcode.TLBI_NH_VA,
                           CmdOpcode.TLBI_NH_VAA, CmdOpcode.TLBI_NSNH_ALL, CmdOpcode.CFGI_CD,
                           CmdOpcode.CFGI_CD_ALL, CmdOpcode.ATC_INV, CmdOpcode.SYNC,
                           CmdOpcode.CFGI_STE, CmdOpcode.TLBI_S12_VMALL)
        w0, w1 = CMD.OPCODE.put(0, opcode), 0
        if opcode in (CmdOpcode.TLBI_NH_ASID, CmdOpcode.TLBI_NH_VA):
            w0 = CMD.ASID.put(w0, self.pick(0, 1, 0xFF, 0xFFFF))
        if opcode in (CmdOpcode.TLBI_NH_VA, CmdOpcode.TLBI_NH_VAA):
            w1 = CMD.VA.put(w1, self.pick(0, 0x1000, 0x12_3456_7000) >> 12 << 12)
            w1 = CMD.LEAF.put(w1, self.pick(0, 1))
            if self.chance(0.5):
                w1 = CMD.TG.put(w1, self.rng.randrange(4))
                w0 = CMD.NUM.put(w0, self.rng.randrange(32))
                w0 = CMD.SCALE.put(w0, self.rng.randrange(32))
                w1 = CMD.TTL.put(w1, self.rng.randrange(4))
        if opcode in (CmdOpcode.CFGI_CD, CmdOpcode.CFGI_CD_ALL, CmdOpcode.ATC_INV):
            w0 = CMD.SID.put(w0, self.pick(0, 0x20, 0x21, 5))
        return self.words(w0, w1, stray=0.25)


def draw_op(d: Draw) -> Op:
    """One operation, its kind weighted towards the nesting objects."""
    kind = d.rng.choices(
        ("ioas_alloc", "ioas_map", "ioas_unmap", "iova_ranges", "hwpt_alloc", "viommu_alloc",
         "vdevice_alloc", "veventq_alloc", "invalidate", "destroy", "hw_info", "attach",
         "detach", "rebind"),
        weights=(6, 8, 5, 3, 12, 8, 7, 5, 9, 8, 3, 7, 2, 1))[0]
    delta, tail = d.size_delta()
    op = Op(kind, size_delta=delta, tail_byte=tail)
    f = op.fields
    if kind == "ioas_alloc":
        f["flags"] = d.flags(0)
    elif kind == "ioas_map":
        known = int(uapi.IoasMapFlags.FIXED_IOVA | uapi.IoasMapFlags.READABLE
                    | uapi.IoasMapFlags.WRITEABLE)
        f.update(ioas_id=d.obj_id(3), flags=d.pick(known, known, known & ~1, 0, d.flags(known)),
                 reserved=d.reserved(), iova=d.iova())
        length = d.length()
        op.user_page = d.pick(0, PAGE, 2 * PAGE, 0x800)
        f["length"] = min(length, MEMORY_PAGES * PAGE - op.user_page)
    elif kind == "ioas_unmap":
        iova = d.pick(d.iova(), 0x4000_0000 + PAGE * d.rng.randrange(8))
        f.update(ioas_id=d.obj_id(3), iova=iova,
                 length=d.pick(d.length(), 0, 2**64 - 1, PAGE * d.rng.randrange(1, 9)))
    elif kind == "iova_ranges":
        f.update(ioas_id=d.obj_id(3), num_iovas=d.pick(0, 1, 2, 8), reserved=d.reserved())
    elif kind == "hwpt_alloc":
        data_type = d.pick(uapi.HwptDataType.NONE, uapi.HwptDataType.ARM_SMMUV3,
                           uapi.HwptDataType.ARM_SMMUV3, uapi.HwptDataType.VTD_S1, 9)
        op.data = d.vste() if data_type else b""
        data_len = len(op.data) if d.chance(0.8) else d.pick(0, 8, 24)
        f.update(flags=d.pick(0, uapi.HwptAllocFlags.NEST_PARENT, uapi.HwptAllocFlags.NEST_PARENT,
                              d.flags(uapi.HwptAllocFlags.NEST_PARENT)),
                 dev_id=d.dev_id(DEVICES), pt_id=d.obj_id(d.pick(3, 5)), reserved=d.reserved(),
                 data_type=data_type, data_len=data_len, fault_id=0 if d.chance(0.9) else 3,
                 reserved2=d.reserved())
    elif kind == "viommu_alloc":
        f.update(flags=d.flags(0), type=d.pick(uapi.ViommuType.ARM_SMMUV3,
                                               uapi.ViommuType.ARM_SMMUV3,
                                               uapi.ViommuType.DEFAULT, 7),
                 dev_id=d.dev_id(DEVICES), hwpt_id=d.obj_id(4), data_len=d.pick(0, 0, 0, 8),
                 reserved=d.reserved())
    elif kind == "vdevice_alloc":
        f.update(viommu_id=d.obj_id(5), dev_id=d.dev_id(DEVICES),
                 virt_id=d.pick(0x20, 0x21, 0, 1 << 32, 0x20))
    elif kind == "veventq_alloc":
        f.update(flags=d.flags(0), viommu_id=d.obj_id(5),
                 type=d.pick(uapi.VeventqType.ARM_SMMUV3, uapi.VeventqType.ARM_SMMUV3,
                             uapi.VeventqType.DEFAULT, 5),
                 veventq_depth=d.pick(0, 1, 64, 1 << 19, 1 << 20), reserved=d.reserved())
    elif kind == "invalidate":
        entry_len = d.pick(16, 16, 16, 16, 16, 8, 24, 0)
        entries = [d.command() for _ in range(d.pick(0, 1, 1, 2, 3))]
        op.data = b"".join(e[:entry_len].ljust(entry_len, b"\0") for e in entries)
        f.update(hwpt_id=d.obj_id(5), data_type=d.pick(1, 1, 1, 0, 4), entry_len=entry_len,
                 entry_num=len(entries), reserved=d.reserved())
    elif kind == "destroy":
        f["id"] = d.obj_id()
    elif kind == "hw_info":
        f.update(flags=d.flags(1), dev_id=d.dev_id(DEVICES), data_len=d.pick(0, 8, 32, 64),
                 out_data_type=d.pick(0, 0, uapi.HwInfoType.ARM_SMMUV3, 1))
    elif kind == "attach":
        f.update(device=d.rng.randrange(DEVICES), pt_id=d.obj_id(d.pick(3, 4)))
    else:  # detach, rebind
        f["device"] = d.rng.randrange(DEVICES)
    return op


# --- running it -----------------------------------------------------------------

_STRUCTS: dict[str, tuple[uapi.Ioctl, type[uapi.UapiStruct], str | None]] = {
    "ioas_alloc": (uapi.Ioctl.IOMMU_IOAS_ALLOC, uapi.IommuIoasAlloc, None),
    "ioas_map": (uapi.Ioctl.IOMMU_IOAS_MAP, uapi.IommuIoasMap, None),
    "ioas_unmap": (uapi.Ioctl.IOMMU_IOAS_UNMAP, uapi.IommuIoasUnmap, None),
    "iova_ranges": (uapi.Ioctl.IOMMU_IOAS_IOVA_RANGES, uapi.IommuIoasIovaRanges,
                    "allowed_iovas"),
    "hwpt_alloc": (uapi.Ioctl.IOMMU_HWPT_ALLOC, uapi.IommuHwptAlloc, "data_uptr"),
    "viommu_alloc": (uapi.Ioctl.IOMMU_VIOMMU_ALLOC, uapi.IommuViommuAlloc, "data_uptr"),
    "vdevice_alloc": (uapi.Ioctl.IOMMU_VDEVICE_ALLOC, uapi.IommuVdeviceAlloc, None),
    "veventq_alloc": (uapi.Ioctl.IOMMU_VEVENTQ_ALLOC, uapi.IommuVeventqAlloc, None),
    "invalidate": (uapi.Ioctl.IOMMU_HWPT_INVALIDATE, uapi.IommuHwptInvalidate, "data_uptr"),
    "destroy": (uapi.Ioctl.IOMMU_DESTROY, uapi.IommuDestroy, None),
    "hw_info": (uapi.Ioctl.IOMMU_GET_HW_INFO, uapi.IommuHwInfo, "data_uptr"),
}


def _masked(cls: type[uapi.UapiStruct], buf: bytearray, size: int) -> dict[str, Any]:
    """The structure's fields as the ioctl left them (pointers masked, fds as >= 0)."""
    whole = bytes(buf[:size]).ljust(ctypes.sizeof(cls), b"\0")[:ctypes.sizeof(cls)]
    inst = cls.from_buffer_copy(whole)
    out: dict[str, Any] = {}
    for name, *_ in cls._fields_:
        value = getattr(inst, name)
        if name in POINTER_FIELDS:
            continue
        if name in FD_FIELDS:
            out[name] = "fd" if value not in (0, 0xFFFF_FFFF) else value
            continue
        out[name] = value if isinstance(value, int) else bytes(value).hex()
    return out


def run_op(target: Target, op: Op, memory: ctypes.Array[ctypes.c_char],
           fds: list[int]) -> dict[str, Any]:
    """Issue ``op``; its outcome: errno (0 = success) and what it wrote."""
    if op.name in ("attach", "detach", "rebind"):
        index = op.fields["device"]
        try:
            if op.name == "attach":
                return {"errno": OUTCOME_OK, "pt_id": target.attach(index, op.fields["pt_id"])}
            if op.name == "rebind":
                return {"errno": OUTCOME_OK, "dev_id": target.rebind(index)}
            target.detach(index)
        except OSError as exc:
            return {"errno": errno.errorcode.get(exc.errno or 0, exc.errno)}
        return {"errno": OUTCOME_OK}
    request, cls, pointer = _STRUCTS[op.name]
    data = ctypes.create_string_buffer(op.data.ljust(DATA_BYTES, b"\0"), DATA_BYTES)
    inst = cls.sized()
    for name, value in op.fields.items():
        setattr(inst, name, value)
    if pointer is not None:
        setattr(inst, pointer, ctypes.addressof(data))
    if op.name == "ioas_map":
        inst.user_va = ctypes.addressof(memory) + op.user_page
    size = ctypes.sizeof(cls) + op.size_delta
    inst.size = size
    buf = bytearray(inst.to_bytes()) + bytes([op.tail_byte]) * max(op.size_delta, 0)
    try:
        target.ioctl(request, buf)
        err: int | str = OUTCOME_OK
    except OSError as exc:
        err = errno.errorcode.get(exc.errno or 0, exc.errno or 0)
    outcome: dict[str, Any] = {"errno": err, "out": _masked(cls, buf, len(buf))}
    if op.name in ("hw_info", "iova_ranges"):
        outcome["wrote"] = bytes(data.raw).rstrip(b"\0").hex()
    if op.name == "veventq_alloc" and err == OUTCOME_OK:
        fds.append(cls.from_buffer_copy(bytes(buf[:ctypes.sizeof(cls)])).out_veventq_fd)
    return outcome


RW_FIXED = int(uapi.IoasMapFlags.FIXED_IOVA | uapi.IoasMapFlags.READABLE
               | uapi.IoasMapFlags.WRITEABLE)
PROLOGUE = (
    # Devices 1 and 2 are bound; then the objects a VMM builds, so the random ops that
    # follow mostly name ids that exist: IOAS 3 (guest RAM mapped), nest parent 4 on it,
    # vIOMMU 5, device 1's vDEVICE 6 (vSID 0x20), vEVENTQ 7.
    Op("ioas_alloc"),
    Op("ioas_map", {"ioas_id": 3, "flags": RW_FIXED, "iova": 0x4000_0000,
                    "length": 8 * PAGE}),
    Op("hwpt_alloc", {"flags": int(uapi.HwptAllocFlags.NEST_PARENT), "dev_id": 1, "pt_id": 3}),
    Op("viommu_alloc", {"type": int(uapi.ViommuType.ARM_SMMUV3), "dev_id": 1, "hwpt_id": 4}),
    Op("vdevice_alloc", {"viommu_id": 5, "dev_id": 1, "virt_id": 0x20}),
    Op("veventq_alloc", {"viommu_id": 5, "type": int(uapi.VeventqType.ARM_SMMUV3),
                         "veventq_depth": 8}),
)


def sequence(seed: int, index: int, ops: int) -> list[Op]:
    """The ops of sequence ``index`` of ``seed`` (the backend plays no part in the draw)."""
    rng = random.Random(f"{seed}/{index}")
    d = Draw(rng)
    return [*PROLOGUE, *(draw_op(d) for _ in range(ops))]


def run(backend: str, seed: int, sequences: int, ops: int) -> Iterator[list[dict[str, Any]]]:
    """Each sequence's outcomes, in order, on a fresh ``backend`` target."""
    for index in range(sequences):
        target = make_target(backend)
        memory = ctypes.create_string_buffer(MEMORY_PAGES * PAGE + PAGE)
        # IOAS_MAP pins pages: the user_va it is given starts page-aligned.
        aligned = (-ctypes.addressof(memory)) % PAGE
        window = (ctypes.c_char * (MEMORY_PAGES * PAGE)).from_buffer(memory, aligned)
        fds: list[int] = []
        try:
            yield [run_op(target, op, window, fds) for op in sequence(seed, index, ops)]
        finally:
            for fd in fds:
                os.close(fd)
            target.close()


def describe(op: Op) -> str:
    """One line naming an op's fields (for a mismatch report)."""
    fields = " ".join(f"{k}={v:#x}" for k, v in op.fields.items())
    extra = f" size{op.size_delta:+d}" if op.size_delta else ""
    extra += f" data={op.data.hex()}" if op.data else ""
    return f"{op.name} {fields}{extra}"


Record = list[list[dict[str, Any]]]


def differences(seed: int, ops: int, ours: Record, reference: Record) -> list[str]:
    """The first divergence of each sequence (``ours`` against ``reference``), described."""
    found: list[str] = []
    if len(ours) != len(reference):
        found.append(f"{len(ours)} sequences against {len(reference)}")
    for index, (a, b) in enumerate(zip(ours, reference, strict=False)):
        drawn = sequence(seed, index, ops)
        for position, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                found.append(f"sequence {index} op {position}: {describe(drawn[position])}\n"
                             f"    sim:    {x}\n    kernel: {y}")
                break
        else:
            if len(a) != len(b):
                found.append(f"sequence {index}: {len(a)} outcomes against {len(b)}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qmp_harness.iommufd_diff",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("sim", "kernel"), default="sim")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sequences", type=int, default=20)
    parser.add_argument("--ops", type=int, default=40)
    parser.add_argument("--compare", metavar="FILE",
                        help="compare this run with a record (e.g. the kernel's) instead of "
                             "printing it; exit 1 on a difference")
    args = parser.parse_args(argv)
    record = list(run(args.backend, args.seed, args.sequences, args.ops))
    if args.compare is None:
        json.dump(record, sys.stdout, separators=(",", ":"))
        print()
        return 0
    with open(args.compare, encoding="utf-8") as file:
        reference = json.load(file)
    found = differences(args.seed, args.ops, record, reference)
    print("\n".join(found) or f"{sum(map(len, record))} ioctls: the same outcomes")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
