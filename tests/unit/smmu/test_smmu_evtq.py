"""Event queue: records, wrap, overflow (OVFLG/OVACKFLG), EVENTQEN, IRQ gating, write abort."""

from __future__ import annotations

import pytest

from vsmmu.arch import Event, EventId
from vsmmu.arch.events import EVENT_SIZE, encode_event
from vsmmu.arch.registers import CR0, EVENTQ_PROD, GERROR, IRQ_CTRL, QUEUE_BASE, Reg
from vsmmu.smmu import SmmuError, SmmuV3
from vsmmu.smmu.guest_driver import GuestDriver


def bad_ste(sid: int) -> Event:
    return Event(EventId.C_BAD_STE, {"sid": sid})


def test_event_lands_in_guest_queue_and_raises_irq(driver: GuestDriver, smmu: SmmuV3) -> None:
    assert smmu.record_event(bad_ste(7))
    assert smmu.irq.level
    events, overflowed = driver.read_events()
    assert [(e.name, e.sid) for e in events] == [("C_BAD_STE", 7)]
    assert not overflowed
    assert not smmu.irq.level  # consumed: the level line drops


def test_raw_records_are_accepted_and_wrong_sizes_rejected(driver: GuestDriver,
                                                           smmu: SmmuV3) -> None:
    assert smmu.record_event(encode_event(EventId.F_TRANSLATION, sid=3, input_addr=0x1000))
    events, _ = driver.read_events()
    assert events[0].name == "F_TRANSLATION" and events[0].fields["input_addr"] == 0x1000
    with pytest.raises(SmmuError, match="expected 32"):
        smmu.record_event(b"\0" * 16)


def test_event_queue_wraps(driver: GuestDriver, smmu: SmmuV3) -> None:
    received = []
    for lap in range(3):
        for i in range(driver.evtq.size - 1):
            assert smmu.record_event(bad_ste(lap * 1000 + i))
        events, overflowed = driver.read_events()
        assert not overflowed
        received.extend(e.sid for e in events)
    assert received == [lap * 1000 + i for lap in range(3) for i in range(driver.evtq.size - 1)]


def test_overflow_sets_ovflg_once_and_guest_acknowledges(driver: GuestDriver,
                                                         smmu: SmmuV3) -> None:
    for i in range(driver.evtq.size):
        assert smmu.record_event(bad_ste(i))
    assert not EVENTQ_PROD.OVFLG.test(smmu.read(Reg.EVENTQ_PROD, 4))
    assert not smmu.record_event(bad_ste(999))  # full: lost
    flagged = smmu.read(Reg.EVENTQ_PROD, 4)
    assert EVENTQ_PROD.OVFLG.test(flagged)
    assert not smmu.record_event(bad_ste(1000))
    assert smmu.read(Reg.EVENTQ_PROD, 4) == flagged  # flagged once, not toggled back
    events, overflowed = driver.read_events()
    assert overflowed and [e.sid for e in events] == list(range(driver.evtq.size))
    assert smmu.record_event(bad_ste(5))
    events, overflowed = driver.read_events()
    assert not overflowed and [e.sid for e in events] == [5]


def test_signal_event_overflow_for_lost_events(driver: GuestDriver, smmu: SmmuV3) -> None:
    smmu.signal_event_overflow()
    _, overflowed = driver.read_events()
    assert overflowed
    _, overflowed = driver.read_events()
    assert not overflowed


def test_events_dropped_while_eventqen_clear(driver: GuestDriver, smmu: SmmuV3) -> None:
    driver.write32(Reg.CR0, smmu.read(Reg.CR0, 4) & ~CR0.EVENTQEN.inplace_mask)
    assert not smmu.record_event(bad_ste(1))
    assert smmu.read(Reg.EVENTQ_PROD, 4) == 0


def test_irq_follows_eventq_irqen(driver: GuestDriver, smmu: SmmuV3) -> None:
    driver.write32(Reg.IRQ_CTRL, IRQ_CTRL.GERROR_IRQEN.place(1))
    assert smmu.record_event(bad_ste(1))
    assert not smmu.irq.level
    driver.write32(Reg.IRQ_CTRL, IRQ_CTRL.GERROR_IRQEN.place(1) | IRQ_CTRL.EVENTQ_IRQEN.place(1))
    assert smmu.irq.level and smmu.irq.assertions == 1


def test_event_write_outside_ram_raises_eventq_abt_err(driver: GuestDriver,
                                                       smmu: SmmuV3) -> None:
    driver.write32(Reg.CR0, smmu.read(Reg.CR0, 4) & ~CR0.EVENTQEN.inplace_mask)
    driver.write64(Reg.EVENTQ_BASE, (driver.ram.base + driver.ram.size)
                   | QUEUE_BASE.LOG2SIZE.place(2))
    driver.write32(Reg.CR0, smmu.read(Reg.CR0, 4) | CR0.EVENTQEN.place(1))
    assert not smmu.record_event(bad_ste(1))
    active = smmu.read(Reg.GERROR, 4) ^ smmu.read(Reg.GERRORN, 4)
    assert GERROR.EVENTQ_ABT_ERR.test(active) and smmu.irq.level
    assert not smmu.record_event(bad_ste(2))  # dropped while the error is active
    assert GERROR.EVENTQ_ABT_ERR.test(driver.acknowledge_gerror())
    assert not smmu.irq.level


def test_event_record_size_matches_queue_stride(driver: GuestDriver, smmu: SmmuV3) -> None:
    smmu.record_event(bad_ste(1))
    smmu.record_event(bad_ste(2))
    second = driver.ram.read(driver.evtq_base + EVENT_SIZE, EVENT_SIZE)
    assert Event(EventId.C_BAD_STE, {"sid": 2}).encode() == second
