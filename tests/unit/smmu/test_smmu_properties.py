"""Property tests: hostile register writes, queue and table contents never crash the model,
never touch memory outside guest RAM, and every error shows in GERROR/CMDQ_CONS.ERR."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st

from vsmmu.arch import CError, CmdOpcode
from vsmmu.arch.commands import COMMAND_SIZE
from vsmmu.arch.events import EVENT_SIZE
from vsmmu.arch.registers import CR0, GERROR, QUEUE_BASE, REGISTER_SPACE_SIZE, Reg
from vsmmu.smmu import (
    GuestMemoryError,
    GuestRam,
    QueuedCommand,
    RecordingConfigSink,
    SmmuFeatures,
    SmmuV3,
    SteStatus,
)
from vsmmu.smmu.guest_driver import GuestDriver

RAM_BASE = 0x4000_0000
RAM_SIZE = 1 << 16
U64 = (1 << 64) - 1


class WatchedRam(GuestRam):
    """Guest RAM that counts refused (out-of-RAM) accesses and logs accepted writes."""

    def __init__(self) -> None:
        super().__init__(RAM_BASE, RAM_SIZE)
        self.refused = 0
        self.writes: list[tuple[int, int]] = []

    def read(self, gpa: int, size: int) -> bytes:
        try:
            return super().read(gpa, size)
        except GuestMemoryError:
            self.refused += 1
            raise

    def write(self, gpa: int, data: bytes) -> None:
        try:
            super().write(gpa, data)
        except GuestMemoryError:
            self.refused += 1
            raise
        self.writes.append((gpa, len(data)))


class CountingSink(RecordingConfigSink):
    """A recording sink that also counts its refusals."""

    def __init__(self, fail: set[CmdOpcode], reject: set[int]) -> None:
        super().__init__()
        self.fail_opcodes = fail
        self.reject_sids = reject
        self.refusals = 0

    def ste_changed(self, first_sid: int, last_sid: int) -> bool:
        ok = super().ste_changed(first_sid, last_sid)
        self.refusals += not ok
        return ok

    def invalidate(self, batch: Sequence[QueuedCommand]) -> int:
        handled = super().invalidate(batch)
        self.refusals += handled < len(batch)
        return handled


addresses = st.one_of(st.integers(0, U64), st.integers(RAM_BASE - 0x100, RAM_BASE + RAM_SIZE))
values = st.one_of(addresses, st.integers(0, 0xFFFF_FFFF), st.sampled_from([0, 1, 0xD, U64]))
offsets = st.one_of(st.sampled_from(list(Reg)), st.integers(-8, REGISTER_SPACE_SIZE + 8))
mmio = st.tuples(st.just("mmio"), offsets, st.sampled_from([1, 2, 4, 8]), values)
events = st.tuples(st.just("event"), st.binary(min_size=EVENT_SIZE, max_size=EVENT_SIZE))
lookups = st.tuples(st.just("lookup"), st.integers(-1, 1 << 17), st.integers(0, 1 << 20))
# Plausible programming, so that queues actually run (partly) inside and outside RAM.
near_ram = st.integers(RAM_BASE - 0x400, RAM_BASE + RAM_SIZE + 0x400).map(lambda a: a & ~0x1F)
queue_bases = st.tuples(near_ram, st.integers(0, 8)).map(
    lambda t: t[0] | QUEUE_BASE.LOG2SIZE.place(t[1]))
setup = st.one_of(
    st.tuples(st.just("mmio"), st.sampled_from([Reg.CMDQ_BASE, Reg.EVENTQ_BASE]), st.just(8),
              queue_bases),
    st.tuples(st.just("mmio"), st.just(Reg.STRTAB_BASE), st.just(8), near_ram),
    st.tuples(st.just("mmio"), st.sampled_from([Reg.CR0, Reg.IRQ_CTRL]), st.just(4),
              st.integers(0, 0xF)),
    st.tuples(st.just("mmio"), st.sampled_from([Reg.CMDQ_PROD, Reg.GERRORN, Reg.EVENTQ_CONS]),
              st.just(4), st.integers(0, 0x3FF)),
)
run_queue = st.tuples(st.just("run"), queue_bases, st.integers(0, 0x3FF))
actions = st.lists(st.one_of(mmio, setup, setup, run_queue, run_queue, events, lookups),
                   max_size=60)


def cmdq_error_active(smmu: SmmuV3) -> bool:
    return GERROR.CMDQ_ERR.test(smmu.active_errors())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ram_image=st.binary(min_size=0, max_size=4096), script=actions,
       fail=st.sets(st.sampled_from(list(CmdOpcode)), max_size=3),
       reject=st.sets(st.integers(0, 0xFFFF), max_size=3), ats=st.booleans())
def test_hostile_guest_never_crashes_and_errors_are_visible(
        ram_image: bytes, script: list[tuple[object, ...]], fail: set[CmdOpcode],
        reject: set[int], ats: bool) -> None:
    ram = WatchedRam()
    ram.data[:len(ram_image)] = ram_image
    sink = CountingSink(fail, reject)
    smmu = SmmuV3(ram, sink, SmmuFeatures(ats=ats, ssidsize=8))
    for action in script:
        refused, refusals = ram.refused, sink.refusals
        was_active = cmdq_error_active(smmu)
        if action[0] == "run":
            _, base, prod = action
            assert isinstance(base, int) and isinstance(prod, int)
            smmu.write(Reg.CR0, 4, smmu.read(Reg.CR0, 4) & ~CR0.CMDQEN.inplace_mask)
            smmu.write(Reg.CMDQ_BASE, 8, base)
            smmu.write(Reg.CMDQ_CONS, 4, 0)
            smmu.write(Reg.CR0, 4, smmu.read(Reg.CR0, 4) | CR0.CMDQEN.place(1))
            smmu.write(Reg.CMDQ_PROD, 4, prod)
            if ram.refused > refused or sink.refusals > refusals:
                hypothesis_event("queue run stopped by abort or refusal")
                assert cmdq_error_active(smmu)
                assert smmu.cmdq_error() in (CError.ILL, CError.ABT)
            elif not was_active and cmdq_error_active(smmu):
                hypothesis_event("queue run stopped by an ill command")
                assert smmu.cmdq_error() is CError.ILL
        elif action[0] == "mmio":
            _, offset, size, value = action
            assert isinstance(offset, int) and isinstance(size, int)
            assert isinstance(value, int)
            smmu.write(offset, size, value & ((1 << (8 * size)) - 1))
            smmu.read(offset, size)
            if ram.refused > refused or sink.refusals > refusals:
                hypothesis_event("command queue stopped by abort or refusal")
                # A fetch abort or a refused command stopped the queue with a code.
                assert cmdq_error_active(smmu)
                assert smmu.cmdq_error() in (CError.ILL, CError.ABT)
            toggled_by_guest = (offset in (Reg.GERRORN, Reg.GERRORN - 4) and size == 8) \
                or offset == Reg.GERRORN
            if cmdq_error_active(smmu) and not was_active and not toggled_by_guest:
                assert smmu.cmdq_error() is not CError.NONE
        elif action[0] == "event":
            record = action[1]
            assert isinstance(record, bytes)
            written = smmu.record_event(record)
            if written:
                hypothesis_event("event written")
            if ram.refused > refused:
                hypothesis_event("event write aborted")
                assert not written and GERROR.EVENTQ_ABT_ERR.test(smmu.active_errors())
        else:
            _, sid, ssid = action
            assert isinstance(sid, int) and isinstance(ssid, int)
            found = smmu.lookup_ste(sid)
            if ram.refused > refused:
                assert found.status is SteStatus.FETCH_ABORT
            smmu.lookup_cd(found, ssid)
        assert smmu.irq.level == bool(smmu.irq.level)
    # The model writes guest RAM only to put event records into its event queue.
    for _gpa, size in ram.writes:
        assert size == EVENT_SIZE


@settings(max_examples=200, deadline=None)
@given(entries=st.lists(st.binary(min_size=COMMAND_SIZE, max_size=COMMAND_SIZE), min_size=1,
                        max_size=40),
       opcodes=st.lists(st.sampled_from(list(CmdOpcode)), min_size=40, max_size=40))
def test_arbitrary_command_queue_contents(entries: list[bytes],
                                          opcodes: list[CmdOpcode]) -> None:
    ram = GuestRam(RAM_BASE, 1 << 22)
    smmu = SmmuV3(ram, RecordingConfigSink())
    drv = GuestDriver(smmu, ram)
    drv.probe()
    drv.reset()
    # Half the entries get a real opcode so the command handlers are exercised too.
    commands = [bytes([op]) + e[1:] if i % 2 else e
                for i, (e, op) in enumerate(zip(entries, opcodes, strict=False))]
    drv.issue(*commands, sync=False)
    if cmdq_error_active(smmu):
        assert smmu.cmdq_error() in (CError.ILL, CError.ABT)
        assert drv.cmdq_cons_pointer() != drv.cmdq_prod
    else:
        assert drv.cmdq_cons_pointer() == drv.cmdq_prod


@settings(max_examples=200, deadline=None)
@given(table=st.binary(min_size=2048, max_size=2048), sid=st.integers(0, 0xFFFF),
       log2size=st.integers(0, 40), split=st.integers(0, 31), fmt=st.integers(0, 3))
def test_arbitrary_stream_tables(table: bytes, sid: int, log2size: int, split: int,
                                 fmt: int) -> None:
    ram = WatchedRam()
    ram.data[:len(table)] = table
    smmu = SmmuV3(ram)
    smmu.write(Reg.STRTAB_BASE, 8, RAM_BASE)
    smmu.write(Reg.STRTAB_BASE_CFG, 4, log2size | (split << 6) | (fmt << 16))
    found = smmu.lookup_ste(sid)
    assert found.status in SteStatus
    for ssid in (0, 1, 0xFF):
        smmu.lookup_cd(found, ssid)
    assert ram.writes == []


def test_queue_base_far_outside_ram_is_contained() -> None:
    ram = WatchedRam()
    smmu = SmmuV3(ram)
    smmu.write(Reg.CMDQ_BASE, 8, QUEUE_BASE.ADDR.clamp(U64) | QUEUE_BASE.LOG2SIZE.place(31))
    smmu.write(Reg.CR0, 4, 0xF)
    smmu.write(Reg.CMDQ_PROD, 4, 0xFFFF_FFFF)
    assert smmu.cmdq_error() is CError.ABT
