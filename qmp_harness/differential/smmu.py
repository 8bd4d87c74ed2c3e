"""Programming an SMMUv3 from outside over qtest: the encodings and one driver.

Written from IHI 0070 (section numbers below) and independent of
``vsmmu.arch``: the bytes these encoders produce go to both SMMUs, so an
encoding mistake of our own model's code cannot hide here.

* :func:`ste` — Stream Table Entry (§5.2), :func:`l1_std` — level-1 stream
  table descriptor (§5.1);
* :func:`cd` — Context Descriptor (§5.4);
* :class:`Cmd` opcodes and :func:`command` — command queue entries (§4);
* :class:`Granule` and :func:`table_desc`/:func:`leaf_desc` — VMSAv8-64
  stage-1 descriptors (Arm ARM D8.3);
* :class:`SmmuDriver` — registers (§6.3), queues, STEs, CDs, DMA through
  the iommu-testdev, and reading the event queue back.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

from qmp_harness.differential.targets import Target
from qmp_harness.qtest import VIRT_RAM, write_line

# -- registers (§6.3) ---------------------------------------------------------

CR0, CR0ACK, CR1, CR2, GBPA, GERROR = 0x20, 0x24, 0x28, 0x2C, 0x44, 0x60
STRTAB_BASE, STRTAB_BASE_CFG = 0x80, 0x88
CMDQ_BASE, CMDQ_PROD, CMDQ_CONS = 0x90, 0x98, 0x9C
EVENTQ_BASE, EVENTQ_PROD, EVENTQ_CONS = 0xA0, 0x100A8, 0x100AC
CR0_SMMUEN, CR0_EVENTQEN, CR0_CMDQEN = 1 << 0, 1 << 2, 1 << 3
GBPA_UPDATE, GBPA_ABORT = 1 << 31, 1 << 20
#: CR1: table and queue accesses Inner/Outer write-back, Inner shareable (what Linux writes).
CR1_WB_ISH = 0xD75
BASE_RA = 1 << 62
STRTAB_FMT_2LVL = 1 << 16
STRTAB_SPLIT_SHIFT = 6
CMDQ_CONS_ERR_SHIFT = 24
CMDQ_CONS_ERR_MASK = 0x7F
EVENT_BYTES = 32
STE_BYTES = 64
CD_BYTES = 64
CMD_BYTES = 16

# -- iommu-testdev (docs/specs/iommu-testdev.rst) -----------------------------

ITD_GVA_LO, ITD_GVA_HI, ITD_LEN, ITD_RESULT = 0x04, 0x08, 0x0C, 0x10
ITD_DBELL, ITD_ATTRS, ITD_GPA_LO, ITD_GPA_HI = 0x14, 0x18, 0x1C, 0x20
ITD_ATTRS_NONSECURE = 0xA
ITD_RESULTS = {0: "OK", 0xDEAD_0001: "BAD_LEN", 0xDEAD_0002: "TX_FAIL",
               0xDEAD_0003: "RD_FAIL", 0xDEAD_0004: "MISMATCH", 0xDEAD_0005: "NOT_ARMED",
               0xDEAD_0006: "BAD_ATTRS", 0xFFFF_FFFE: "BUSY", 0xFFFF_FFFF: "IDLE"}
DWORD = 0xFFFF_FFFF


def _place(value: int, high: int, low: int) -> int:
    width = high - low + 1
    if not 0 <= value < 1 << width:
        raise ValueError(f"{value:#x} does not fit bits [{high}:{low}]")
    return value << low


# -- STE (§5.2) and the level-1 descriptor (§5.1) ------------------------------


class SteConfig(enum.IntEnum):
    """STE.Config (§5.2, "Config")."""

    ABORT = 0b000
    BYPASS = 0b100
    S1_TRANS = 0b101
    S2_TRANS = 0b110
    NESTED = 0b111


@dataclasses.dataclass(frozen=True)
class Ste:
    """The STE fields a stage-1 scenario sets; everything else 0."""

    valid: int = 1
    config: int = SteConfig.S1_TRANS
    s1fmt: int = 0
    s1_context_ptr: int = 0
    s1cdmax: int = 0
    s1dss: int = 0
    s1cir: int = 1
    s1cor: int = 1
    s1csh: int = 3
    eats: int = 0
    strw: int = 0
    shcfg: int = 0
    #: Stage-2 words (2 and 3) as given: an S2 STE's fields, or junk an S1 STE must ignore.
    word2: int = 0
    word3: int = 0


def ste(entry: Ste) -> bytes:
    """The 64-byte STE."""
    word0 = (_place(entry.valid, 0, 0) | _place(entry.config, 3, 1) | _place(entry.s1fmt, 5, 4)
             | _place(entry.s1_context_ptr >> 6, 51, 6) | _place(entry.s1cdmax, 63, 59))
    word1 = (_place(entry.s1dss, 1, 0) | _place(entry.s1cir, 3, 2) | _place(entry.s1cor, 5, 4)
             | _place(entry.s1csh, 7, 6) | _place(entry.eats, 29, 28)
             | _place(entry.strw, 31, 30) | _place(entry.shcfg, 45, 44))
    return b"".join(w.to_bytes(8, "little") for w in (word0, word1, entry.word2, entry.word3)
                    ).ljust(STE_BYTES, b"\0")


def s2_words(*, vttb: int, t0sz: int = 0x14, sl0: int = 2, tg: int = 0, ps: int = 5,
             vmid: int = 0) -> tuple[int, int]:
    """STE words 2 and 3 for a stage-2 configuration (§5.2: S2VMID ... S2TTB)."""
    word2 = (_place(vmid, 15, 0) | _place(t0sz, 37, 32) | _place(sl0, 39, 38)
             | _place(tg, 47, 46) | _place(ps, 50, 48) | _place(1, 51, 51))
    return word2, _place(vttb >> 4, 51, 4)


def l1_std(l2ptr: int, span: int) -> bytes:
    """A level-1 stream table descriptor: Span[4:0], L2Ptr[51:6]."""
    return (_place(span, 4, 0) | _place(l2ptr >> 6, 51, 6)).to_bytes(8, "little")


# -- CD (§5.4) -------------------------------------------------------------------


class Tg0(enum.IntEnum):
    """CD.TG0 encodings."""

    K4 = 0
    K64 = 1
    K16 = 2


@dataclasses.dataclass(frozen=True)
class Cd:
    """The CD fields a scenario sets (TTB1 half disabled unless given)."""

    ttb0: int
    t0sz: int = 16
    tg0: int = Tg0.K4
    ir0: int = 1
    or0: int = 1
    sh0: int = 3
    epd0: int = 0
    epd1: int = 1
    t1sz: int = 0
    tg1: int = 2
    valid: int = 1
    ips: int = 5
    affd: int = 0
    tbi: int = 0
    aa64: int = 1
    hd: int = 0
    ha: int = 0
    s: int = 0
    r: int = 1
    a: int = 1
    asid: int = 0x1E20
    ttb1: int = 0
    mair: int = 0x0000_0000_0044_FF04


def cd(entry: Cd) -> bytes:
    """The 64-byte CD."""
    word0 = (_place(entry.t0sz, 5, 0) | _place(entry.tg0, 7, 6) | _place(entry.ir0, 9, 8)
             | _place(entry.or0, 11, 10) | _place(entry.sh0, 13, 12) | _place(entry.epd0, 14, 14)
             | _place(entry.t1sz, 21, 16) | _place(entry.tg1, 23, 22)
             | _place(entry.epd1, 30, 30) | _place(entry.valid, 31, 31)
             | _place(entry.ips, 34, 32) | _place(entry.affd, 35, 35)
             | _place(entry.tbi, 39, 38) | _place(entry.aa64, 41, 41) | _place(entry.hd, 42, 42)
             | _place(entry.ha, 43, 43) | _place(entry.s, 44, 44) | _place(entry.r, 45, 45)
             | _place(entry.a, 46, 46) | _place(entry.asid, 63, 48))
    word1 = _place(entry.ttb0 >> 4, 55, 4)
    word2 = _place(entry.ttb1 >> 4, 55, 4)
    return b"".join(w.to_bytes(8, "little") for w in (word0, word1, word2, entry.mair)
                    ).ljust(CD_BYTES, b"\0")


# -- commands (§4) -----------------------------------------------------------------


class Cmd(enum.IntEnum):
    """Command opcodes."""

    CFGI_STE = 0x03
    CFGI_STE_RANGE = 0x04
    CFGI_CD = 0x05
    CFGI_CD_ALL = 0x06
    TLBI_NH_ALL = 0x10
    TLBI_NH_ASID = 0x11
    TLBI_NH_VA = 0x12
    TLBI_NH_VAA = 0x13
    TLBI_NSNH_ALL = 0x30
    SYNC = 0x46


#: CMD_CFGI_STE_RANGE with Range=31: every StreamID (what Linux calls CFGI_ALL).
CFGI_ALL_RANGE = 31


def command(op: Cmd, *, sid: int = 0, ssid: int = 0, asid: int = 0, leaf: int = 0,
            address: int = 0, span: int = 0) -> bytes:
    """One 16-byte command; each opcode uses the fields §4 gives it."""
    word0 = _place(op, 7, 0)
    word1 = 0
    if op in (Cmd.CFGI_STE, Cmd.CFGI_STE_RANGE, Cmd.CFGI_CD, Cmd.CFGI_CD_ALL):
        word0 |= _place(sid, 63, 32)
    if op is Cmd.CFGI_CD:
        word0 |= _place(ssid, 31, 12)
    if op in (Cmd.CFGI_STE, Cmd.CFGI_CD):
        word1 = _place(leaf, 0, 0)
    if op is Cmd.CFGI_STE_RANGE:
        word1 = _place(span, 4, 0)
    if op in (Cmd.TLBI_NH_ASID, Cmd.TLBI_NH_VA):
        word0 |= _place(asid, 63, 48)
    if op in (Cmd.TLBI_NH_VA, Cmd.TLBI_NH_VAA):
        word1 = _place(leaf, 0, 0) | _place(address >> 12, 63, 12)
    return word0.to_bytes(8, "little") + word1.to_bytes(8, "little")


# -- stage-1 descriptors (Arm ARM D8.3) -------------------------------------------


@dataclasses.dataclass(frozen=True)
class Granule:
    """A translation granule: page shift and what a table level covers."""

    shift: int

    @property
    def size(self) -> int:
        """Bytes per page (and per table)."""
        return 1 << self.shift

    @property
    def stride(self) -> int:
        """Index bits per level."""
        return self.shift - 3

    def level_shift(self, level: int) -> int:
        """Lowest VA bit a level-``level`` entry indexes (level 3 = page)."""
        return self.shift + (3 - level) * self.stride

    def start_level(self, va_bits: int) -> int:
        """The walk's first level for ``va_bits`` of input address."""
        levels = -(-(va_bits - self.shift) // self.stride)
        return 4 - levels

    def index(self, va: int, level: int) -> int:
        """The table index ``va`` uses at ``level``."""
        return (va >> self.level_shift(level)) & ((1 << self.stride) - 1)

    @property
    def tg0(self) -> Tg0:
        """CD.TG0 for this granule."""
        return {12: Tg0.K4, 14: Tg0.K16, 16: Tg0.K64}[self.shift]


GRANULES = (Granule(12), Granule(14), Granule(16))
DESC_VALID, DESC_TABLE = 1 << 0, 1 << 1
OUTPUT_MASK = (1 << 48) - 1


@dataclasses.dataclass(frozen=True)
class Leaf:
    """A stage-1 block or page descriptor's attributes."""

    ap: int = 0b01
    af: int = 1
    sh: int = 3
    attr_index: int = 1
    ng: int = 0
    #: Bits OR-ed in as given (e.g. ignored/software bits or reserved ones).
    extra: int = 0


def table_desc(next_table: int) -> int:
    """A table descriptor pointing at ``next_table``."""
    return (next_table & OUTPUT_MASK) | DESC_VALID | DESC_TABLE


def leaf_desc(output: int, leaf: Leaf, *, page: bool) -> int:
    """A page (level 3) or block descriptor mapping to ``output``."""
    value = (output | _place(leaf.attr_index, 4, 2) | _place(leaf.ap, 7, 6)
             | _place(leaf.sh, 9, 8) | _place(leaf.af, 10, 10) | _place(leaf.ng, 11, 11)
             | leaf.extra | DESC_VALID)
    return value | DESC_TABLE if page else value


# -- the driver --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the structures live in guest RAM (all scratch, cleared per scenario)."""

    strtab: int = VIRT_RAM + 0x10_0000
    l2_strtabs: int = VIRT_RAM + 0x11_0000
    cmdq: int = VIRT_RAM + 0x12_0000
    evtq: int = VIRT_RAM + 0x12_1000
    cds: int = VIRT_RAM + 0x13_0000
    tables: int = VIRT_RAM + 0x20_0000
    tables_end: int = VIRT_RAM + 0x80_0000
    output: int = VIRT_RAM + 0x100_0000
    output_size: int = 0x10_0000
    cmdq_log2: int = 8
    evtq_log2: int = 7

    @property
    def scratch(self) -> tuple[int, int]:
        """The range to clear before a scenario."""
        return self.strtab, self.tables_end - self.strtab


@dataclasses.dataclass(frozen=True)
class DmaOutcome:
    """What one iommu-testdev DMA did: RESULT after the trigger."""

    iova: int
    gpa: int
    length: int
    result: int
    #: EVENTQ_PROD after the DMA (not compared: it groups the records by DMA).
    events_after: int = dataclasses.field(default=0, compare=False)

    def __str__(self) -> str:
        name = ITD_RESULTS.get(self.result, f"{self.result:#x}")
        return f"DMA iova={self.iova:#x} gpa={self.gpa:#x} len={self.length}: {name}"


class SmmuDriver:
    """One target's SMMU and iommu-testdev, programmed over qtest (module docstring)."""

    def __init__(self, target: Target, layout: Layout | None = None) -> None:
        self.target = target
        self.qtest = target.qtest
        self.base = target.smmu_base
        self.layout = layout or Layout()
        self.prod = 0
        self.cr0 = 0

    async def write_reg(self, offset: int, value: int) -> None:
        """A 32-bit register write."""
        await self.qtest.writel(self.base + offset, value)

    async def read_reg(self, offset: int) -> int:
        """A 32-bit register read."""
        return await self.qtest.readl(self.base + offset)

    async def write_reg64(self, offset: int, value: int) -> None:
        """A 64-bit register as two 32-bit writes, low half first (what Linux's lo_hi does)."""
        await self.qtest.pipeline([f"writel {self.base + offset:#x} {value & DWORD:#x}",
                                   f"writel {self.base + offset + 4:#x} {value >> 32:#x}"])

    async def write(self, address: int, data: bytes) -> None:
        """Store ``data`` in guest RAM."""
        await self.qtest.write(address, data)

    async def writes(self, items: Sequence[tuple[int, bytes]]) -> None:
        """Store several pieces in one pipeline."""
        await self.qtest.pipeline([write_line(address, data) for address, data in items])

    async def set_cr0(self, value: int) -> int:
        """Write CR0; return CR0ACK read straight after."""
        self.cr0 = value
        await self.write_reg(CR0, value)
        return await self.read_reg(CR0ACK)

    async def clear_scratch(self) -> None:
        """Zero every structure and the output window."""
        start, length = self.layout.scratch
        await self.qtest.memset(start, length)
        await self.qtest.memset(self.layout.output, self.layout.output_size)

    async def setup_queues(self, *, strtab_cfg: int, strtab_base: int | None = None,
                           cmdq: bool = True, evtq: bool = True) -> None:
        """CR1, the stream table base and format, the queues; enable the queues (not SMMUEN)."""
        lay = self.layout
        await self.set_cr0(0)
        await self.write_reg(CR1, CR1_WB_ISH)
        base = lay.strtab if strtab_base is None else strtab_base
        await self.write_reg64(STRTAB_BASE, BASE_RA | base)
        await self.write_reg(STRTAB_BASE_CFG, strtab_cfg)
        await self.write_reg64(CMDQ_BASE, BASE_RA | lay.cmdq | lay.cmdq_log2)
        await self.write_reg(CMDQ_PROD, 0)
        await self.write_reg(CMDQ_CONS, 0)
        self.prod = 0
        await self.write_reg64(EVENTQ_BASE, BASE_RA | lay.evtq | lay.evtq_log2)
        await self.write_reg(EVENTQ_PROD, 0)
        await self.write_reg(EVENTQ_CONS, 0)
        value = (CR0_CMDQEN if cmdq else 0) | (CR0_EVENTQEN if evtq else 0)
        await self.set_cr0(value)

    async def enable(self) -> int:
        """Set SMMUEN (keeping the queues); CR0ACK."""
        return await self.set_cr0(self.cr0 | CR0_SMMUEN)

    async def issue(self, commands: Sequence[bytes], *, sync: bool = True) -> int:
        """Queue ``commands`` (+ CMD_SYNC), move PROD; return CMDQ_CONS."""
        lay = self.layout
        entries = [*commands, command(Cmd.SYNC)] if sync else list(commands)
        lines = []
        for entry in entries:
            index = self.prod & ((1 << lay.cmdq_log2) - 1)
            lines.append(write_line(lay.cmdq + index * CMD_BYTES, entry))
            self.prod = (self.prod + 1) & ((2 << lay.cmdq_log2) - 1)
        lines.append(f"writel {self.base + CMDQ_PROD:#x} {self.prod:#x}")
        lines.append(f"readl {self.base + CMDQ_CONS:#x}")
        return int((await self.qtest.pipeline(lines))[-1], 16)

    async def dma(self, iova: int, gpa: int, length: int) -> DmaOutcome:
        """One iommu-testdev DMA (arm, trigger, read RESULT)."""
        bar = self.target.testdev_bar
        replies = await self.qtest.pipeline([
            f"writel {bar + ITD_GVA_LO:#x} {iova & DWORD:#x}",
            f"writel {bar + ITD_GVA_HI:#x} {iova >> 32:#x}",
            f"writel {bar + ITD_GPA_LO:#x} {gpa & DWORD:#x}",
            f"writel {bar + ITD_GPA_HI:#x} {gpa >> 32:#x}",
            f"writel {bar + ITD_LEN:#x} {length:#x}",
            f"writel {bar + ITD_ATTRS:#x} {ITD_ATTRS_NONSECURE:#x}",
            f"writel {bar + ITD_DBELL:#x} 0x1",
            f"readl {bar:#x}",
            f"readl {bar + ITD_RESULT:#x}",
            f"readl {self.base + EVENTQ_PROD:#x}"])
        return DmaOutcome(iova, gpa, length, int(replies[-2], 16), int(replies[-1], 16))

    async def events(self) -> list[bytes]:
        """Every record between EVENTQ_CONS and EVENTQ_PROD (the queue is not consumed)."""
        lay = self.layout
        prod, cons = (int(v, 16) for v in await self.qtest.pipeline([
            f"readl {self.base + EVENTQ_PROD:#x}", f"readl {self.base + EVENTQ_CONS:#x}"]))
        entries = 1 << lay.evtq_log2
        wrap_mask = (2 << lay.evtq_log2) - 1
        count = ((prod & wrap_mask) - (cons & wrap_mask)) & wrap_mask
        lines = [f"read {lay.evtq + ((cons + i) % entries) * EVENT_BYTES:#x} {EVENT_BYTES:#x}"
                 for i in range(min(count, entries))]
        return [bytes.fromhex(reply.removeprefix("0x"))
                for reply in await self.qtest.pipeline(lines)]

    async def output_window(self) -> bytes:
        """The output window's bytes (where translated DMAs land)."""
        return await self.qtest.read(self.layout.output, self.layout.output_size)
