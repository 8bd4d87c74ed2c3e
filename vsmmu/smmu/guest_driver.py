"""A guest-side SMMUv3 driver that does what Linux's arm-smmu-v3 does, for tests.

It touches the model only through MMIO (:meth:`SmmuV3.read`/``write``) and
guest RAM, in the order of Linux's ``arm_smmu_device_probe`` /
``arm_smmu_device_reset`` (DESIGN.md §8): probe the ID registers, disable,
program CR1/CR2, the 2-level stream table, the command queue, CMD_CFGI_ALL
+ CMD_SYNC, CMD_TLBI_NSNH_ALL + CMD_SYNC, the event queue, IRQ_CTRL, and
finally SMMUEN.  Commands are issued Linux-style: written at PROD, PROD
written, CMD_SYNC completion polled by reading CMDQ_CONS.

Useful beyond this package's tests: the translator and service tests can
drive a model (or a vfio-user-served SMMU with an MMIO adaptor) with it.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Protocol

from vsmmu.arch.commands import COMMAND_SIZE, CmdOpcode, SyncCs, encode_cfgi_all, encode_command
from vsmmu.arch.events import EVENT_SIZE, Event, decode_event
from vsmmu.arch.registers import (
    CMDQ_CONS,
    CR0,
    CR1,
    CR2,
    EVENTQ_CONS,
    EVENTQ_PROD,
    GBPA,
    IDR0,
    IDR1,
    IRQ_CTRL,
    QUEUE_BASE,
    STRTAB_BASE,
    STRTAB_BASE_CFG,
    QueueIndex,
    Reg,
    StrtabFmt,
    TtEndian,
    Ttf,
)
from vsmmu.arch.ste import L1_STD_SIZE, STE_SIZE, L1Std, Ste, strtab_split_index
from vsmmu.smmu.interfaces import SmmuError

logger = logging.getLogger(__name__)

LINUX_STRTAB_SPLIT = 8
"""Linux's STRTAB_SPLIT: 256 STEs per level-2 table."""
LINUX_CR1 = (CR1.TABLE_SH.place(3) | CR1.TABLE_OC.place(1) | CR1.TABLE_IC.place(1)
             | CR1.QUEUE_SH.place(3) | CR1.QUEUE_OC.place(1) | CR1.QUEUE_IC.place(1))
"""Inner-shareable, write-back queues and tables: the 0xD75 of DESIGN.md §8."""
LINUX_CR2 = CR2.PTM.place(1) | CR2.RECINVSID.place(1)
LINUX_CMDQ_BATCH_SHIFT = 6


class GuestDriverError(SmmuError):
    """The SMMU did not behave as the Linux driver requires."""


@dataclasses.dataclass
class GuestLayout:
    """Where the driver puts its structures in guest RAM (offsets from RAM base)."""

    strtab: int = 0x0000
    cmdq: int = 0x10000
    evtq: int = 0x20000
    l2_tables: int = 0x40000
    cmdq_log2: int = 8
    evtq_log2: int = 7


class RegisterPort(Protocol):
    """The SMMU as the driver reaches it: register reads and writes by offset (MMIO).

    :class:`SmmuV3` itself, or an adaptor to a vSMMU served elsewhere (vfio-user).
    """

    def read(self, offset: int, size: int) -> int:
        """Read ``size`` bytes at register ``offset``."""
        ...

    def write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes at register ``offset``."""
        ...


class DriverRam(Protocol):
    """Guest RAM as the driver uses it: its base and accesses by guest-physical address."""

    base: int

    def read(self, gpa: int, size: int) -> bytes:
        """``size`` bytes at ``gpa``."""
        ...

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at ``gpa``."""
        ...


class GuestDriver:
    """Drives an SMMU through MMIO like Linux's arm-smmu-v3 would."""

    def __init__(self, smmu: RegisterPort, ram: DriverRam,
                 layout: GuestLayout | None = None) -> None:
        self.smmu = smmu
        self.ram = ram
        self.layout = layout if layout is not None else GuestLayout()
        self.sid_bits = 0
        self.cmdq = QueueIndex(self.layout.cmdq_log2)
        self.evtq = QueueIndex(self.layout.evtq_log2)
        self.cmdq_prod = 0
        self.evtq_cons = 0
        self._l2_next = ram.base + self.layout.l2_tables
        self._l2_tables: dict[int, int] = {}

    # ------------------------------------------------------------------ access

    def read32(self, reg: Reg) -> int:
        """readl_relaxed of a register."""
        return self.smmu.read(reg, 4)

    def write32(self, reg: Reg, value: int) -> None:
        """writel_relaxed of a register."""
        self.smmu.write(reg, 4, value)

    def write64(self, reg: Reg, value: int) -> None:
        """writeq_relaxed of a register."""
        self.smmu.write(reg, 8, value)

    @property
    def strtab_base(self) -> int:
        """GPA of the level-1 stream table."""
        return self.ram.base + self.layout.strtab

    @property
    def cmdq_base(self) -> int:
        """GPA of the command queue."""
        return self.ram.base + self.layout.cmdq

    @property
    def evtq_base(self) -> int:
        """GPA of the event queue."""
        return self.ram.base + self.layout.evtq

    # ------------------------------------------------------------ probe/reset

    def probe(self) -> None:
        """Read and check the ID registers as arm_smmu_device_hw_probe does."""
        idr0 = self.read32(Reg.IDR0)
        if IDR0.TTENDIAN.get(idr0) not in (TtEndian.MIXED, TtEndian.LE):
            raise GuestDriverError(f"IDR0.TTENDIAN={IDR0.TTENDIAN.get(idr0)}: no LE tables")
        if not (IDR0.S1P.test(idr0) or IDR0.S2P.test(idr0)):
            raise GuestDriverError("IDR0: neither S1P nor S2P")
        if IDR0.TTF.get(idr0) not in (Ttf.AARCH64, Ttf.AARCH32_AND_AARCH64):
            raise GuestDriverError(f"IDR0.TTF={IDR0.TTF.get(idr0)}: no AArch64 tables")
        idr1 = self.read32(Reg.IDR1)
        if IDR1.TABLES_PRESET.test(idr1) or IDR1.QUEUES_PRESET.test(idr1) or IDR1.REL.test(idr1):
            raise GuestDriverError(f"IDR1={idr1:#x}: embedded implementation not supported")
        if IDR1.CMDQS.get(idr1) <= LINUX_CMDQ_BATCH_SHIFT:
            raise GuestDriverError(f"IDR1.CMDQS={IDR1.CMDQS.get(idr1)}: queue too small")
        self.sid_bits = IDR1.SIDSIZE.get(idr1)
        self.read32(Reg.IDR3)
        self.read32(Reg.IDR5)

    def reset(self) -> None:
        """The register sequence of arm_smmu_device_reset (DESIGN.md §8)."""
        self._wait_cr0(0)
        self.write32(Reg.CR1, LINUX_CR1)
        self.write32(Reg.CR2, LINUX_CR2)
        self.write64(Reg.STRTAB_BASE, STRTAB_BASE.RA.place(1) | self.strtab_base)
        self.write32(Reg.STRTAB_BASE_CFG, STRTAB_BASE_CFG.FMT.place(StrtabFmt.TWO_LEVEL)
                     | STRTAB_BASE_CFG.LOG2SIZE.place(self.sid_bits)
                     | STRTAB_BASE_CFG.SPLIT.place(LINUX_STRTAB_SPLIT))
        self.write64(Reg.CMDQ_BASE, QUEUE_BASE.RA_WA.place(1) | self.cmdq_base
                     | QUEUE_BASE.LOG2SIZE.place(self.layout.cmdq_log2))
        self.write32(Reg.CMDQ_PROD, 0)
        self.write32(Reg.CMDQ_CONS, 0)
        self.cmdq_prod = 0
        enables = CR0.CMDQEN.place(1)
        self._wait_cr0(enables)
        self.issue(encode_cfgi_all())
        self.issue(encode_command(CmdOpcode.TLBI_NSNH_ALL))
        self.write64(Reg.EVENTQ_BASE, QUEUE_BASE.RA_WA.place(1) | self.evtq_base
                     | QUEUE_BASE.LOG2SIZE.place(self.layout.evtq_log2))
        self.write32(Reg.EVENTQ_PROD, 0)
        self.write32(Reg.EVENTQ_CONS, 0)
        self.evtq_cons = 0
        enables |= CR0.EVENTQEN.place(1)
        self._wait_cr0(enables)
        self._write_irq_ctrl(0)
        self._write_irq_ctrl(IRQ_CTRL.EVENTQ_IRQEN.place(1) | IRQ_CTRL.GERROR_IRQEN.place(1))
        enables |= CR0.SMMUEN.place(1)
        self._wait_cr0(enables)

    def _wait_cr0(self, value: int) -> None:
        self.write32(Reg.CR0, value)
        ack = self.read32(Reg.CR0ACK)
        if ack != value:
            raise GuestDriverError(f"CR0ACK={ack:#x} after writing CR0={value:#x}")

    def _write_irq_ctrl(self, value: int) -> None:
        self.write32(Reg.IRQ_CTRL, value)
        ack = self.read32(Reg.IRQ_CTRLACK)
        if ack != value:
            raise GuestDriverError(f"IRQ_CTRLACK={ack:#x} after writing IRQ_CTRL={value:#x}")

    def update_gbpa(self, set_bits: int, clear_bits: int) -> int:
        """arm_smmu_update_gbpa: read-modify-write with UPDATE, poll UPDATE clear."""
        gbpa = self.read32(Reg.GBPA)
        gbpa = (gbpa & ~clear_bits) | set_bits
        self.write32(Reg.GBPA, gbpa | GBPA.UPDATE.place(1))
        value = self.read32(Reg.GBPA)
        if GBPA.UPDATE.test(value):
            raise GuestDriverError(f"GBPA.UPDATE still set: {value:#x}")
        return value

    # -------------------------------------------------------------- commands

    def issue(self, *commands: bytes, sync: bool = True) -> int:
        """Queue ``commands`` (+ a CMD_SYNC), write PROD, read CONS back once and return it."""
        entries = list(commands)
        if sync:
            entries.append(encode_command(CmdOpcode.SYNC, cs=SyncCs.SEV))
        for command in entries:
            if len(command) != COMMAND_SIZE:
                raise GuestDriverError(f"command of {len(command)} bytes")
            address = self.cmdq_base + self.cmdq.index(self.cmdq_prod) * COMMAND_SIZE
            self.ram.write(address, command)
            self.cmdq_prod = self.cmdq.increment(self.cmdq_prod)
        self.write32(Reg.CMDQ_PROD, self.cmdq_prod)
        return self.read32(Reg.CMDQ_CONS)

    def cmdq_cons_pointer(self) -> int:
        """CMDQ_CONS without ERR."""
        return self.cmdq.pointer(self.read32(Reg.CMDQ_CONS))

    def cmdq_cons_error(self) -> int:
        """CMDQ_CONS.ERR."""
        return CMDQ_CONS.ERR.get(self.read32(Reg.CMDQ_CONS))

    def cmdq_index_of(self, pointer: int) -> int:
        """Entry index of a queue pointer."""
        return self.cmdq.index(pointer)

    def acknowledge_gerror(self) -> int:
        """arm_smmu_gerror_handler: write GERRORN = GERROR; return the active bits."""
        gerror = self.read32(Reg.GERROR)
        gerrorn = self.read32(Reg.GERRORN)
        self.write32(Reg.GERRORN, gerror)
        return gerror ^ gerrorn

    def replace_command(self, pointer: int, command: bytes) -> None:
        """Overwrite the queue entry at ``pointer`` (Linux replaces a bad command by a SYNC)."""
        self.ram.write(self.cmdq_base + self.cmdq.index(pointer) * COMMAND_SIZE, command)

    # ---------------------------------------------------------- stream table

    def ste_address(self, sid: int) -> int:
        """GPA of the STE of ``sid``, allocating its level-2 table (Span=SPLIT+1)."""
        l1_index, l2_index = strtab_split_index(sid, LINUX_STRTAB_SPLIT)
        table = self._l2_tables.get(l1_index)
        if table is None:
            table = self._l2_next
            self._l2_next += STE_SIZE << LINUX_STRTAB_SPLIT
            self._l2_tables[l1_index] = table
            self.ram.write(self.strtab_base + l1_index * L1_STD_SIZE,
                           L1Std(span=LINUX_STRTAB_SPLIT + 1, l2ptr=table).encode())
        return table + l2_index * STE_SIZE

    def write_ste(self, sid: int, ste: Ste) -> None:
        """Write the STE of ``sid`` and issue CMD_CFGI_STE + CMD_SYNC."""
        self.ram.write(self.ste_address(sid), ste.encode())
        self.issue(encode_command(CmdOpcode.CFGI_STE, sid=sid, leaf=1))

    def write_l1_descriptor(self, l1_index: int, descriptor: L1Std) -> None:
        """Write a level-1 stream table descriptor directly."""
        self.ram.write(self.strtab_base + l1_index * L1_STD_SIZE, descriptor.encode())

    # ------------------------------------------------------------ event queue

    def read_events(self) -> tuple[list[Event], bool]:
        """arm_smmu_evtq_thread: drain events; return them and whether an overflow was seen."""
        prod_reg = self.read32(Reg.EVENTQ_PROD)
        prod = self.evtq.pointer(prod_reg)
        events: list[Event] = []
        while not self.evtq.is_empty(prod, self.evtq_cons):
            address = self.evtq_base + self.evtq.index(self.evtq_cons) * EVENT_SIZE
            events.append(decode_event(self.ram.read(address, EVENT_SIZE)))
            self.evtq_cons = self.evtq.increment(self.evtq_cons)
        overflow = EVENTQ_PROD.OVFLG.get(prod_reg)
        cons_reg = self.read32(Reg.EVENTQ_CONS)
        overflowed = overflow != EVENTQ_CONS.OVACKFLG.get(cons_reg)
        self.write32(Reg.EVENTQ_CONS, EVENTQ_CONS.OVACKFLG.place(overflow) | self.evtq_cons)
        return events, overflowed

