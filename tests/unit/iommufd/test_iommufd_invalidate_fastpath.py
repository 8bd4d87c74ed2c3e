"""HWPT_INVALIDATE on the sim: the batch fast path keeps the kernel's semantics.

The typed call with the native entry size hands the words straight to the
physical SMMU and deletes IOTLB entries in place; a padded ``entry_len`` goes
through the byte-array core the raw ioctl uses.  Both are compared here with
a reference written from the rules (arm_vsmmu_convert_user_cmd + the IOTLB
match of each TLBI form) on hypothesis-generated IOTLBs and command batches,
including refused commands, whose index must come back as ``handled``.
"""

from __future__ import annotations

import errno
import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vsmmu.arch.commands import CMD, CmdOpcode
from vsmmu.iommufd import uapi
from vsmmu.iommufd.backend import HostMapping, IommufdError
from vsmmu.iommufd.faults import BackendOp, FaultInjectingBackend
from vsmmu.iommufd.sim import (
    ALLOWED_INVALIDATIONS,
    TLB_PAGE_SHIFT,
    PhysicalSmmu,
    SimIommufd,
    SimViommu,
    TlbEntry,
)

RAM_IPA = 0x4000_0000
RAM_SIZE = 1 << 16
VSID = 0x21
PSID = 0x1000
OTHER_VMID = 99
ASIDS = (1, 7)
PAGES = 64
PADDED_ENTRY_LEN = uapi.ARM_INVALIDATE_ENTRY_SIZE + 8
_VIEW = memoryview(bytearray(1 << TLB_PAGE_SHIFT))
_BY_STREAM = {CmdOpcode.ATC_INV, CmdOpcode.CFGI_CD, CmdOpcode.CFGI_CD_ALL}


def nested_sim() -> tuple[SimIommufd, int, SimViommu]:
    sim = SimIommufd()
    dev = sim.create_mock_device(PSID)
    ioas = sim.ioas_alloc()
    sim.ioas_map(ioas, HostMapping(mmap.mmap(-1, RAM_SIZE)), iova=RAM_IPA)
    s2 = sim.hwpt_alloc(dev, ioas, flags=uapi.HwptAllocFlags.NEST_PARENT)
    viommu_id = sim.viommu_alloc(dev, s2)
    sim.vdevice_alloc(viommu_id, dev, VSID)
    viommu = sim.object(viommu_id)
    assert isinstance(viommu, SimViommu)
    return sim, viommu_id, viommu


@st.composite
def tlb_entry(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """(vmid selector, asid, page, leaf pages log2, writable) of one cached 4K page."""
    return (draw(st.integers(0, 1)), draw(st.sampled_from(ASIDS)), draw(st.integers(0, PAGES)),
            draw(st.integers(0, 4)), draw(st.integers(0, 1)))


@st.composite
def command(draw: st.DrawFn) -> tuple[int, int]:
    """A command with the fields the kernel lets its opcode carry (arm_vsmmu_validate_user_cmd
    refuses any other bit, tested against the kernel by the conformance suite); mostly
    allowed opcodes (a refused one ends the batch), sometimes any opcode."""
    opcode = draw(st.sampled_from(sorted(ALLOWED_INVALIDATIONS))
                  if draw(st.integers(0, 7)) else st.integers(0, CMD.OPCODE.mask))
    w0 = CMD.OPCODE.place(opcode)
    w1 = 0
    # SID and ASID share dw0's top bits: a command carries the one its format has.
    if opcode in _BY_STREAM:
        w0 |= CMD.SID.place(draw(st.sampled_from([VSID, VSID + 1])))
    elif opcode in (CmdOpcode.TLBI_NH_VA, CmdOpcode.TLBI_NH_ASID):
        w0 |= CMD.ASID.place(draw(st.sampled_from(ASIDS)))
    if opcode in (CmdOpcode.TLBI_NH_VA, CmdOpcode.TLBI_NH_VAA):
        w1 = CMD.VA.place(draw(st.integers(0, PAGES)) << TLB_PAGE_SHIFT)
        tg = draw(st.integers(0, CMD.TG.mask))
        if tg:
            # A range needs NUM/SCALE or a TTL; TTL 1 with 16K granules needs DS.
            num, scale = draw(st.integers(0, CMD.NUM.mask)), draw(st.integers(0, CMD.SCALE.mask))
            ttl = draw(st.integers(0 if num or scale else 1, CMD.TTL.mask))
            ttl = 2 if (tg, ttl) == (2, 1) else ttl
            w0 |= CMD.NUM.place(num) | CMD.SCALE.place(scale)
            w1 |= CMD.TG.place(tg) | CMD.TTL.place(ttl)
    return w0, w1


def fill_tlb(smmu: PhysicalSmmu, vmid: int, entries: list[tuple[int, int, int, int, int]]) -> None:
    for other, asid, page, leaf_log2, writable in entries:
        leaf_pages = 1 << leaf_log2
        leaf_base = (page & ~(leaf_pages - 1)) << TLB_PAGE_SHIFT
        key = (OTHER_VMID if other else vmid, asid, page)
        smmu.tlb[key] = TlbEntry(leaf_base, leaf_pages << TLB_PAGE_SHIFT, _VIEW, 0,
                                 bool(writable))


def tlbi_range(w0: int, w1: int) -> tuple[int, int]:
    """[start, end) of TLBI_NH_VA/VAA by IHI 0070 §4.4.1: TG=0 is the one address; else
    (NUM + 1) * 2**SCALE granules of 4K/16K/64K (TG 1/2/3) from the address."""
    address = CMD.VA.get(w1)
    granule_shift = {0: None, 1: 12, 2: 14, 3: 16}[CMD.TG.get(w1)]
    if granule_shift is None:
        return address, address + 1
    granules = (CMD.NUM.get(w0) + 1) * 2 ** CMD.SCALE.get(w0)
    return address, address + granules * 2 ** granule_shift


def reference(tlb: dict[tuple[int, int, int], TlbEntry], vmid: int,
              batch: list[tuple[int, int]]) -> tuple[set[tuple[int, int, int]], int, int]:
    """(surviving keys, handled, errno or 0) by the rules, one command at a time.

    The kernel issues the commands it has converted every 63 (arm_vsmmu_cache_invalidate,
    CMDQ_BATCH_ENTRIES - 1): a refused one leaves the state of the last block issued.
    """
    live = dict(tlb)
    issued = dict(tlb)
    for index, (w0, w1) in enumerate(batch):
        if index % 63 == 0:
            issued = dict(live)
        opcode = CMD.OPCODE.get(w0)
        if opcode not in ALLOWED_INVALIDATIONS:
            return set(issued), index, errno.EIO
        if opcode in _BY_STREAM:
            if CMD.SID.get(w0) != VSID:
                return set(issued), index, errno.EIO
            continue
        asid = CMD.ASID.get(w0)
        if opcode in (CmdOpcode.TLBI_NH_ALL, CmdOpcode.TLBI_NSNH_ALL):
            live = {k: e for k, e in live.items() if k[0] != vmid}
        elif opcode == CmdOpcode.TLBI_NH_ASID:
            live = {k: e for k, e in live.items() if k[0] != vmid or k[1] != asid}
        else:
            start, end = tlbi_range(w0, w1)
            any_asid = opcode == CmdOpcode.TLBI_NH_VAA
            live = {k: e for k, e in live.items()
                    if not (k[0] == vmid and (any_asid or k[1] == asid)
                            and e.leaf_base < end and start < e.leaf_base + e.leaf_size)}
    return set(live), len(batch), 0


@settings(max_examples=300)
@given(cached=st.lists(tlb_entry(), max_size=40), batch=st.lists(command(), min_size=1,
                                                                   max_size=8),
       padded=st.booleans())
def test_invalidate_batch_equals_the_rules(cached: list[tuple[int, int, int, int, int]],
                                           batch: list[tuple[int, int]], padded: bool) -> None:
    sim, viommu_id, viommu = nested_sim()
    fill_tlb(sim.smmu, viommu.vmid, cached)
    expected_keys, expected_handled, expected_errno = reference(sim.smmu.tlb, viommu.vmid,
                                                                batch)
    entry_len = PADDED_ENTRY_LEN if padded else uapi.ARM_INVALIDATE_ENTRY_SIZE
    try:
        handled = sim.hwpt_invalidate(viommu_id, batch, entry_len=entry_len)
        err = 0
    except IommufdError as exc:
        handled, err = exc.handled, exc.errno or 0
    assert (handled, err) == (expected_handled, expected_errno)
    assert set(sim.smmu.tlb) == expected_keys


@given(bad=st.sampled_from([(-1, 0), (0, 1 << 64), (1 << 70, 1), (0, -5)]),
       index=st.integers(0, 2), padded=st.booleans())
def test_out_of_range_words_are_einval_before_any_entry(bad: tuple[int, int], index: int,
                                                        padded: bool) -> None:
    """A word that no le64 can hold never reaches the array: EINVAL, nothing handled."""
    sim, viommu_id, viommu = nested_sim()
    fill_tlb(sim.smmu, viommu.vmid, [(0, ASIDS[0], 1, 0, 1)])
    nsnh_all = (CMD.OPCODE.place(CmdOpcode.TLBI_NSNH_ALL), 0)
    batch = [nsnh_all] * 3
    batch[index] = bad
    entry_len = PADDED_ENTRY_LEN if padded else uapi.ARM_INVALIDATE_ENTRY_SIZE
    try:
        sim.hwpt_invalidate(viommu_id, batch, entry_len=entry_len)
    except IommufdError as exc:
        assert (exc.errno, exc.handled) == (errno.EINVAL, 0)
    else:
        raise AssertionError(f"entry {bad} accepted")
    assert len(sim.smmu.tlb) == 1  # not even the entries before the bad one took effect


def test_header_errors_precede_entries() -> None:
    sim, viommu_id, _ = nested_sim()
    bad_opcode = (CMD.OPCODE.place(CmdOpcode.CFGI_STE), 0)
    for id_, data_type, entries, want in (
            (viommu_id + 100, uapi.HwptInvalidateDataType.ARM_SMMUV3, [bad_opcode], errno.ENOENT),
            (viommu_id, uapi.HwptInvalidateDataType.ARM_SMMUV3 + 1, [bad_opcode], errno.EINVAL),
            (viommu_id, uapi.HwptInvalidateDataType.ARM_SMMUV3, [], errno.EINVAL)):
        try:
            sim.hwpt_invalidate(id_, entries, data_type=data_type)
        except IommufdError as exc:
            assert exc.errno == want and exc.handled == 0
        else:
            raise AssertionError(f"HWPT_INVALIDATE on {id_} type {data_type} accepted")


@pytest.mark.parametrize(("refused_at", "issued"), [(1, False), (62, False), (63, True),
                                                    (100, True)])
def test_a_refused_command_drops_the_partly_filled_block_before_it(refused_at: int,
                                                                   issued: bool) -> None:
    """arm_vsmmu_cache_invalidate (AS:501-523) issues converted commands 63 at a time; a
    conversion failure returns entry_num = its index, and the block it was filling is never
    issued (the translator issues those commands again; the sim does what the kernel does)."""
    sim, viommu_id, viommu = nested_sim()
    fill_tlb(sim.smmu, viommu.vmid, [(0, ASIDS[0], 1, 0, 1)])
    nh_all = (CMD.OPCODE.place(CmdOpcode.TLBI_NH_ALL), 0)
    refused = (CMD.OPCODE.place(CmdOpcode.CFGI_STE), 0)
    with pytest.raises(IommufdError) as info:
        sim.hwpt_invalidate(viommu_id, [nh_all] * refused_at + [refused])
    assert (info.value.errno, info.value.handled) == (errno.EIO, refused_at)
    assert (len(sim.smmu.tlb) == 0) == issued


@pytest.mark.parametrize(("entry", "issued"), [(1, False), (62, False), (63, True)])
def test_an_injected_refusal_at_entry_k_issues_what_the_kernel_would(entry: int,
                                                                      issued: bool) -> None:
    """x-vsmmu-fail's refusal at entry k plays the kernel's: only the whole blocks of 63
    before k reach the host, and handled = k."""
    sim, viommu_id, viommu = nested_sim()
    fill_tlb(sim.smmu, viommu.vmid, [(0, ASIDS[0], 1, 0, 1)])
    faults = FaultInjectingBackend(sim)
    faults.arm(BackendOp.HWPT_INVALIDATE, errno.EIO, entry=entry)
    nh_all = (CMD.OPCODE.place(CmdOpcode.TLBI_NH_ALL), 0)
    with pytest.raises(IommufdError) as info:
        faults.hwpt_invalidate(viommu_id, [nh_all] * (entry + 1))
    assert (info.value.errno, info.value.handled) == (errno.EIO, entry)
    assert (len(sim.smmu.tlb) == 0) == issued
