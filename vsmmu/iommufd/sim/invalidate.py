"""``IOMMU_HWPT_INVALIDATE`` before the physical SMMU sees it: the kernel's header
checks (``iommufd_hwpt_invalidate``), its copy of the user's entry array and its
check of each command (``arm_vsmmu_validate_user_cmd``, :class:`UserCommandCheck`)."""

from __future__ import annotations

import errno
from collections.abc import Callable, Container, Sequence

from vsmmu.arch.commands import CMD, CmdOpcode
from vsmmu.arch.fields import Field
from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import InvalidationCommand, IommufdError
from vsmmu.iommufd.sim.host import HostPersonality
from vsmmu.iommufd.sim.objects import SimHwptNested, SimObject, SimViommu
from vsmmu.iommufd.sim.objects import sim_error as _err

_OP = "HWPT_INVALIDATE"
_ENTRY = uapi.ARM_INVALIDATE_ENTRY_SIZE
_WORD = _ENTRY // 2
_PAGE = 4096
"""The host's PAGE_SIZE: the largest entry_len iommufd_hwpt_invalidate accepts."""


def invalidation_bounds(entry_num: int, entry_len: int) -> None:
    """``iommufd_hwpt_invalidate``'s bounds on a non-empty array: EINVAL outside them."""
    if entry_num and (entry_len == 0 or entry_len > _PAGE
                      or entry_num > uapi.HWPT_INVALIDATE_ENTRY_NUM_MAX):
        raise _err(errno.EINVAL, _OP, f"entry_num {entry_num} entry_len {entry_len}: out of "
                                      f"bounds (1..{_PAGE} bytes, at most "
                                      f"{uapi.HWPT_INVALIDATE_ENTRY_NUM_MAX} entries)")


def invalidation_target(obj: SimObject | None, id_: int, entry_num: int, data_type: int,
                        entry_len: int) -> SimViommu:
    """The vIOMMU ``id_`` names (``obj``), after the header checks in the kernel's order."""
    invalidation_bounds(entry_num, entry_len)
    if obj is None:
        raise _err(errno.ENOENT, _OP, f"hwpt_id {id_}: no such object")
    if isinstance(obj, SimHwptNested):
        raise _err(errno.EOPNOTSUPP, _OP, f"hwpt {id_}: ARM nested HWPTs invalidate via vIOMMU")
    if not isinstance(obj, SimViommu):
        raise _err(errno.EINVAL, _OP, f"hwpt_id {id_}: a {obj.type.value}, expected vIOMMU")
    if data_type != uapi.HwptInvalidateDataType.ARM_SMMUV3:
        raise _err(errno.EINVAL, _OP, f"data_type {data_type}: expected ARM_SMMUV3")
    if not entry_num:
        raise _err(errno.EINVAL, _OP, "entry_num 0")
    return obj


def copy_entries(array: bytes, entry_num: int, entry_len: int) -> list[InvalidationCommand]:
    """The entries of the user array, each as ``copy_struct_from_user`` copies it.

    The whole array is copied before any entry is converted: a short entry
    is zero-extended, a long one must have a zero tail (else E2BIG, 0 handled).
    """
    entries: list[InvalidationCommand] = []
    for index in range(entry_num):
        raw = array[index * entry_len : (index + 1) * entry_len]
        if any(raw[_ENTRY:]):
            raise _err(errno.E2BIG, _OP, f"entry {index}: non-zero bytes past {_ENTRY}")
        raw = raw[:_ENTRY].ljust(_ENTRY, b"\0")
        entries.append((int.from_bytes(raw[:_WORD], "little"),
                        int.from_bytes(raw[_WORD:], "little")))
    return entries


def lay_out_entries(entries: Sequence[InvalidationCommand], entry_len: int) -> bytes:
    """``entries`` as a user array of ``entry_len``-byte entries (truncated or zero-padded)."""
    return b"".join(
        (w0.to_bytes(_WORD, "little") + w1.to_bytes(_WORD, "little"))[:entry_len]
        .ljust(entry_len, b"\0")
        for w0, w1 in entries
    )


def _range_ok(w0: int, w1: int, host: HostPersonality) -> bool:
    """``arm_vsmmu_validate_range``: refuse the range encodings the spec calls Reserved."""
    ranged = CMD.NUM.test(w0) or CMD.SCALE.test(w0)
    ttl, tg = CMD.TTL.get(w1), CMD.TG.get(w1)
    if not tg:
        return not (ranged or ttl)
    granule_16k, ttl_level_1 = 2, 1
    if tg == granule_16k and ttl == ttl_level_1 and not host.ds:
        return False
    return ranged or bool(ttl)


def _mask(*fields: Field) -> int:
    mask = 0
    for f in fields:
        mask |= f.inplace_mask
    return mask


_RANGED = (CmdOpcode.TLBI_NH_VA, CmdOpcode.TLBI_NH_VAA)
_OPCODE = CMD.OPCODE.inplace_mask
_NUM_SCALE = _mask(CMD.NUM, CMD.SCALE)
_TG_TTL = _mask(CMD.TG, CMD.TTL)
_SID_SHIFT, _SID_MASK = CMD.SID.lsb, CMD.SID.mask


def _range_checked(opcode: int, host: HostPersonality) -> bool:
    """Whether ``arm_vsmmu_validate_range`` runs for ``opcode`` (a TLBI by VA on a RIL host)."""
    return opcode in _RANGED and host.range_invalidation


def _allowed_bits(opcode: int, host: HostPersonality) -> tuple[int, int] | None:
    """The bits of (word 0, word 1) a guest may set in ``opcode`` on ``host``.

    None for an opcode refused whole.
    """
    allowed0, allowed1 = CMD.OPCODE.inplace_mask, 0
    asid = CMD.ASID.put(0, (1 << host.asid_bits) - 1)
    if opcode in _RANGED:
        if opcode == CmdOpcode.TLBI_NH_VA:
            allowed0 |= asid
        if host.range_invalidation:
            allowed0 |= _NUM_SCALE
            allowed1 |= _TG_TTL
        allowed0 |= CMD.VMID.inplace_mask
        allowed1 |= _mask(CMD.LEAF, CMD.VA)
    elif opcode in (CmdOpcode.TLBI_NH_ASID, CmdOpcode.TLBI_NH_ALL):
        allowed0 |= CMD.VMID.inplace_mask | (asid if opcode == CmdOpcode.TLBI_NH_ASID else 0)
    elif opcode == CmdOpcode.ATC_INV:
        if not host.ats:
            return None
        if host.ssid_bits:
            allowed0 |= _mask(CMD.SSV, CMD.SSID, CMD.ATC_GLOBAL)
        allowed0 |= CMD.SID.inplace_mask
        allowed1 |= _mask(CMD.ATC_SIZE, CMD.VA)
    elif opcode in (CmdOpcode.CFGI_CD, CmdOpcode.CFGI_CD_ALL):
        if opcode == CmdOpcode.CFGI_CD:
            allowed0 |= CMD.SSID.inplace_mask if host.ssid_bits else 0
            allowed1 |= CMD.LEAF.inplace_mask
        allowed0 |= CMD.SID.inplace_mask
    elif opcode != CmdOpcode.TLBI_NSNH_ALL:
        return None
    return allowed0, allowed1


def _atc_size_reserved(_w0: int, w1: int) -> bool:
    return CMD.ATC_SIZE.get(w1) > uapi.ATC_INV_SIZE_ALL


def _range_missing(w0: int, _w1: int) -> bool:
    return not w0 & _NUM_SCALE


_Rule = tuple[int, int, Callable[[int, int], bool] | None, bool]
"""(word 0 bits allowed, word 1 bits allowed, the encodings no mask can express: refused
when it returns True, whether the command names a vSID the vIOMMU must know)."""
_BY_STREAM = frozenset({CmdOpcode.ATC_INV, CmdOpcode.CFGI_CD, CmdOpcode.CFGI_CD_ALL})
"""arm_vsmmu_convert_user_cmd turns their vSID into the physical StreamID (EIO without one)."""


def _rule(opcode: int, tg_ttl: int, allowed: tuple[int, int],
          host: HostPersonality) -> _Rule | None:
    """The check of ``opcode`` commands whose TG/TTL bits are ``tg_ttl``; None: all refused.

    A range check's outcome depends on TG, TTL and whether NUM/SCALE are zero:
    with TG/TTL fixed, it is either always met, or met only without a range
    (NUM/SCALE not allowed), or only with one, or never.
    """
    allowed0, allowed1 = allowed
    by_stream = opcode in _BY_STREAM
    if opcode == CmdOpcode.ATC_INV:
        return allowed0, allowed1, _atc_size_reserved, by_stream
    if not _range_checked(opcode, host):
        return allowed0, allowed1, None, by_stream
    single_ok = _range_ok(opcode, tg_ttl, host)
    ranged_ok = _range_ok(opcode | CMD.NUM.place(1), tg_ttl, host)
    if single_ok and ranged_ok:
        return allowed0, allowed1, None, by_stream
    if single_ok:
        return allowed0 & ~_NUM_SCALE, allowed1, None, by_stream
    if ranged_ok:
        return allowed0, allowed1, _range_missing, by_stream
    return None


class UserCommandCheck:
    """``arm_vsmmu_validate_user_cmd`` of one host, compiled into a table.

    Each opcode has its set of fields a guest may set (which depends on the
    host SMMU's ASID and SubstreamID widths, range invalidation, DS and ATS);
    any other bit (a RES0 bit, SSEC...) would raise CERROR_ILL on the shared
    queue, so the kernel refuses the command (EIO) before it gets there.

    The invalidation batch is a hot path, so what the kernel decides per
    command from the opcode and the range fields is decided once per host:
    the table is keyed by the opcode (word 0) together with TG and TTL (word
    1, bit positions the opcode does not use), and a command passes when it
    has a rule, sets only bits the rule allows and no rule test refuses it.  A refused
    command's error names the first of the kernel's checks it fails.
    """

    def __init__(self, host: HostPersonality) -> None:
        self.host = host
        tg_ttls = [CMD.TG.place(tg) | CMD.TTL.place(ttl)
                   for tg in range(CMD.TG.mask + 1) for ttl in range(CMD.TTL.mask + 1)]
        self._rules: dict[int, _Rule] = {}
        for opcode in range(CMD.OPCODE.mask + 1):
            allowed = _allowed_bits(opcode, host)
            if allowed is None:
                continue
            for tg_ttl in tg_ttls:
                rule = _rule(opcode, tg_ttl, allowed, host)
                if rule is not None:
                    self._rules[opcode | tg_ttl] = rule

    def first_refused(self, entries: Sequence[InvalidationCommand],
                      vsids: Container[int]) -> int | None:
        """The index of the first entry the kernel refuses, or None when it takes them all:
        arm_vsmmu_validate_user_cmd, then the vSID lookup of the commands naming one
        (``vsids``: the vIOMMU's vDEVICEs).

        An entry taken sets only bits its opcode allows, so its words are
        unsigned 64-bit values (``w | allowed == allowed`` holds for no negative
        ``w`` and no ``w`` with a bit above the mask's).
        """
        rules = self._rules
        for index, (w0, w1) in enumerate(entries):
            try:
                allowed0, allowed1, test, by_stream = rules[w0 & _OPCODE | w1 & _TG_TTL]
            except KeyError:
                return index  # the opcode, or its TG/TTL, refused whole
            if w0 | allowed0 != allowed0 or w1 | allowed1 != allowed1 or (
                    test is not None and test(w0, w1)) or (
                    by_stream and w0 >> _SID_SHIFT & _SID_MASK not in vsids):
                return index
        return None

    def refusal(self, w0: int, w1: int, op: str = _OP, handled: int = 0) -> IommufdError:
        """The EIO for a command :meth:`first_refused` refuses: the first check it fails,
        in the kernel's order (opcode, range fields, ATC size, then any other bit)."""
        host = self.host
        opcode = CMD.OPCODE.get(w0)
        allowed = _allowed_bits(opcode, host)
        if allowed is None:
            if opcode == CmdOpcode.ATC_INV:
                return _err(errno.EIO, op, "ATC_INV: the host SMMU has no ATS", handled)
            return _err(errno.EIO, op, f"command opcode {opcode:#04x}: not an allowed "
                                       "invalidation", handled)
        if _range_checked(opcode, host) and not _range_ok(w0, w1, host):
            return _err(errno.EIO, op, f"{CmdOpcode(opcode).name}: reserved range encoding "
                                       f"{w0:#018x} {w1:#018x}", handled)
        if opcode == CmdOpcode.ATC_INV and _atc_size_reserved(w0, w1):
            return _err(errno.EIO, op, f"ATC_INV size {CMD.ATC_SIZE.get(w1)}: above "
                                       f"{uapi.ATC_INV_SIZE_ALL}", handled)
        allowed0, allowed1 = allowed
        if w0 & ~allowed0 or w1 & ~allowed1 or opcode not in _BY_STREAM:
            return _err(errno.EIO, op, f"{CmdOpcode(opcode).name}: bits {w0 & ~allowed0:#018x} "
                                       f"{w1 & ~allowed1:#018x} not allowed for this opcode",
                        handled)
        return _err(errno.EIO, op, f"{CmdOpcode(opcode).name}: vSID {CMD.SID.get(w0):#x} has "
                                   "no vDEVICE on this vIOMMU (arm_vsmmu_vsid_to_sid)", handled)
