"""A tiny static AArch64 Linux ELF for B3, hand-assembled (the guest has no compiler).

:func:`mmio_loop_elf` returns a program that

1. opens ``/dev/mem`` (``O_RDWR|O_SYNC``) and maps the 4 KiB page holding the
   register at physical address ``phys``;
2. times ``iterations`` x ``ldr w10, [reg]`` over that mapping with
   ``clock_gettime(CLOCK_MONOTONIC)`` before and after;
3. times the same loop over an anonymous RAM page (the loop's own cost, to
   subtract);
4. writes :data:`RESULT` to stdout — the two nanosecond deltas and the last
   value the register read returned, little-endian u64s — and exits 0 (1 if
   ``openat`` or ``mmap`` failed).

Only the handful of A64 instructions it needs are encoded here, each from its
encoding class in the Arm ARM (DDI 0487, C4 "A64 instruction set encoding").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# --- Linux arm64 syscall ABI (include/uapi/asm-generic/unistd.h, fcntl.h, mman.h) ---
SYS_OPENAT, SYS_MMAP, SYS_CLOCK_GETTIME, SYS_WRITE, SYS_EXIT = 56, 222, 113, 64, 93
AT_FDCWD = -100
O_RDWR = 0o2
O_SYNC = 0o4010000
PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
CLOCK_MONOTONIC = 1
STDOUT = 1
NSEC_PER_SEC = 1_000_000_000
PAGE_SIZE = 4096
PAGE_MASK = PAGE_SIZE - 1
EXIT_FAILED = 1
RESULT = struct.Struct("<QQQ")
"""What the program writes: MMIO loop ns, RAM loop ns, the last register value read."""
RESULT_SIZE = RESULT.size

# --- ELF64 (System V gABI; EM_AARCH64) ---
ELF_LOAD_ADDRESS = 0x40_0000
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
ELF_IDENT = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, LE, version 1, SysV
ET_EXEC, EM_AARCH64, EV_CURRENT = 2, 183, 1
PT_LOAD = 1
PF_X, PF_W, PF_R = 1, 2, 4
SEGMENT_ALIGN = 0x1_0000

# --- A64 encodings ---
XZR = 31
COND_NE = 0x1
_MOVZ_X, _MOVK_X, _MOVN_X = 0xD280_0000, 0xF280_0000, 0x9280_0000
_ORR_X_REG = 0xAA00_03E0
_ADR = 0x1000_0000
_LDR_LITERAL_X = 0x5800_0000
_LDR_W_UIMM, _LDR_X_UIMM, _STR_X_UIMM = 0xB940_0000, 0xF940_0000, 0xF900_0000
_SUBS_X_IMM = 0xF100_0000
_ADD_X_REG, _SUB_X_REG = 0x8B00_0000, 0xCB00_0000
_MADD_X = 0x9B00_0000
_B_COND, _BL = 0x5400_0000, 0x9400_0000
_TBNZ_X63 = 0xB7F8_0000
_SVC_0, _RET = 0xD400_0001, 0xD65F_03C0
_IMM16_MASK, _HALFWORDS = 0xFFFF, 4


class AssemblyError(ValueError):
    """An operand does not fit its instruction field."""


def _fit(value: int, bits: int, what: str, *, signed: bool = False) -> int:
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= value <= high:
        raise AssemblyError(f"{what} {value} does not fit {bits} bits ({low}..{high})")
    return value & ((1 << bits) - 1)


@dataclass
class Assembler:
    """A one-pass assembler with labels fixed up at :meth:`assemble`."""

    words: list[int | tuple[str, str]] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    data_labels: dict[str, int] = field(default_factory=dict)

    def emit(self, word: int) -> None:
        """Append one encoded instruction."""
        self.words.append(word)

    def label(self, name: str) -> None:
        """Define ``name`` at the next instruction."""
        self.labels[name] = len(self.words) * 4

    def quad(self, name: str, value: int) -> None:
        """Reserve an 8-byte data word ``name`` (8-aligned) holding ``value``."""
        self.data_labels[name] = len(self.data)
        self.data += struct.pack("<Q", value & (2**64 - 1))

    # --- instructions ---
    def mov_imm(self, rd: int, value: int) -> None:
        """MOVZ/MOVN + MOVKs: any 64-bit constant into Xd."""
        value &= 2**64 - 1
        halves = [(value >> (16 * i)) & _IMM16_MASK for i in range(_HALFWORDS)]
        if sum(h == _IMM16_MASK for h in halves) > sum(h == 0 for h in halves):
            first = next((i for i, h in enumerate(halves) if h != _IMM16_MASK), 0)
            self.emit(_MOVN_X | first << 21 | (~halves[first] & _IMM16_MASK) << 5 | rd)
            rest = [i for i, h in enumerate(halves) if h != _IMM16_MASK and i != first]
        else:
            first = next((i for i, h in enumerate(halves) if h != 0), 0)
            self.emit(_MOVZ_X | first << 21 | halves[first] << 5 | rd)
            rest = [i for i, h in enumerate(halves) if h != 0 and i != first]
        for i in rest:
            self.emit(_MOVK_X | i << 21 | halves[i] << 5 | rd)

    def mov(self, rd: int, rm: int) -> None:
        """MOV Xd, Xm (ORR Xd, XZR, Xm)."""
        self.emit(_ORR_X_REG | rm << 16 | rd)

    def adr(self, rd: int, target: str) -> None:
        """ADR Xd, <data label or code label>."""
        self.words.append(("adr", f"{rd}:{target}"))

    def ldr_w(self, rt: int, rn: int, offset: int = 0) -> None:
        """LDR Wt, [Xn, #offset] (32-bit load)."""
        self.emit(_LDR_W_UIMM | _fit(offset // 4, 12, "LDR W offset") << 10 | rn << 5 | rt)

    def ldr_x(self, rt: int, rn: int, offset: int = 0) -> None:
        """LDR Xt, [Xn, #offset]."""
        self.emit(_LDR_X_UIMM | _fit(offset // 8, 12, "LDR X offset") << 10 | rn << 5 | rt)

    def str_x(self, rt: int, rn: int, offset: int = 0) -> None:
        """STR Xt, [Xn, #offset]."""
        self.emit(_STR_X_UIMM | _fit(offset // 8, 12, "STR X offset") << 10 | rn << 5 | rt)

    def subs_imm(self, rd: int, rn: int, imm: int) -> None:
        """SUBS Xd, Xn, #imm."""
        self.emit(_SUBS_X_IMM | _fit(imm, 12, "SUBS immediate") << 10 | rn << 5 | rd)

    def add(self, rd: int, rn: int, rm: int) -> None:
        """ADD Xd, Xn, Xm."""
        self.emit(_ADD_X_REG | rm << 16 | rn << 5 | rd)

    def sub(self, rd: int, rn: int, rm: int) -> None:
        """SUB Xd, Xn, Xm."""
        self.emit(_SUB_X_REG | rm << 16 | rn << 5 | rd)

    def madd(self, rd: int, rn: int, rm: int, ra: int) -> None:
        """MADD Xd, Xn, Xm, Xa (Xd = Xa + Xn*Xm)."""
        self.emit(_MADD_X | rm << 16 | ra << 10 | rn << 5 | rd)

    def b_ne(self, target: str) -> None:
        """B.NE <label>."""
        self.words.append(("b.ne", target))

    def bl(self, target: str) -> None:
        """BL <label>."""
        self.words.append(("bl", target))

    def tbnz_sign(self, rt: int, target: str) -> None:
        """TBNZ Xt, #63, <label>: branch if Xt is negative."""
        self.words.append(("tbnz", f"{rt}:{target}"))

    def svc(self) -> None:
        """SVC #0."""
        self.emit(_SVC_0)

    def ret(self) -> None:
        """RET (X30)."""
        self.emit(_RET)

    def assemble(self) -> tuple[bytes, bytes]:
        """(code, data); data follows code 8-aligned in the same segment."""
        code_size = len(self.words) * 4
        data_base = (code_size + 7) & ~7
        out = bytearray()
        for index, item in enumerate(self.words):
            here = index * 4
            if isinstance(item, int):
                out += struct.pack("<I", item)
                continue
            kind, arg = item
            if kind == "adr":
                reg_text, name = arg.split(":")
                where = (data_base + self.data_labels[name] if name in self.data_labels
                         else self.labels[name])
                imm = _fit(where - here, 21, "ADR offset", signed=True)
                word = _ADR | (imm & 3) << 29 | (imm >> 2) << 5 | int(reg_text)
            elif kind == "b.ne":
                imm = _fit((self.labels[arg] - here) // 4, 19, "B.cond offset", signed=True)
                word = _B_COND | imm << 5 | COND_NE
            elif kind == "bl":
                word = _BL | _fit((self.labels[arg] - here) // 4, 26, "BL offset", signed=True)
            else:
                reg_text, name = arg.split(":")
                imm = _fit((self.labels[name] - here) // 4, 14, "TBZ offset", signed=True)
                word = _TBNZ_X63 | imm << 5 | int(reg_text)
            out += struct.pack("<I", word)
        out += bytes(data_base - code_size)
        return bytes(out), bytes(self.data)


def _syscall(asm: Assembler, number: int) -> None:
    asm.mov_imm(8, number)
    asm.svc()


def mmio_loop_program(phys: int, iterations: int) -> Assembler:
    """The program of the module docstring, not yet laid out as an ELF."""
    if iterations < 1:
        raise AssemblyError(f"iterations {iterations}: expected at least 1")
    asm = Assembler()
    asm.quad("ts0_sec", 0)
    asm.quad("ts0_nsec", 0)
    asm.quad("ts1_sec", 0)
    asm.quad("ts1_nsec", 0)
    asm.quad("result_mmio", 0)
    asm.quad("result_ram", 0)
    asm.quad("result_value", 0)
    path = b"/dev/mem\0"
    asm.data_labels["path"] = len(asm.data)
    asm.data += path + bytes(-len(path) % 8)
    # x19 = fd, x20 = mapped register, x21 = iterations
    asm.mov_imm(21, iterations)
    asm.mov_imm(0, AT_FDCWD)
    asm.adr(1, "path")
    asm.mov_imm(2, O_RDWR | O_SYNC)
    asm.mov_imm(3, 0)
    _syscall(asm, SYS_OPENAT)
    asm.tbnz_sign(0, "fail")
    asm.mov(19, 0)
    asm.mov_imm(0, 0)
    asm.mov_imm(1, PAGE_SIZE)
    asm.mov_imm(2, PROT_READ)
    asm.mov_imm(3, MAP_SHARED)
    asm.mov(4, 19)
    asm.mov_imm(5, phys & ~PAGE_MASK)
    _syscall(asm, SYS_MMAP)
    asm.tbnz_sign(0, "fail")
    asm.mov_imm(9, phys & PAGE_MASK)
    asm.add(20, 0, 9)
    asm.bl("measure")
    asm.adr(9, "result_mmio")
    asm.str_x(0, 9)
    asm.str_x(23, 9, 16)   # result_value: the last register value read
    asm.mov_imm(0, 0)
    asm.mov_imm(1, PAGE_SIZE)
    asm.mov_imm(2, PROT_READ | PROT_WRITE)
    asm.mov_imm(3, MAP_PRIVATE | MAP_ANONYMOUS)
    asm.mov_imm(4, -1)
    asm.mov_imm(5, 0)
    _syscall(asm, SYS_MMAP)
    asm.tbnz_sign(0, "fail")
    asm.mov(20, 0)
    asm.str_x(XZR, 20)  # touch the page so the loop does not read the shared zero page fault
    asm.bl("measure")
    asm.adr(9, "result_ram")
    asm.str_x(0, 9)
    asm.mov_imm(0, STDOUT)
    asm.adr(1, "result_mmio")
    asm.mov_imm(2, RESULT_SIZE)
    _syscall(asm, SYS_WRITE)
    asm.mov_imm(0, 0)
    _syscall(asm, SYS_EXIT)
    asm.label("fail")
    asm.mov_imm(0, EXIT_FAILED)
    _syscall(asm, SYS_EXIT)
    # measure: x20 = address, x21 = count -> x0 = nanoseconds; keeps x30 in x22.
    asm.label("measure")
    asm.mov(22, 30)
    asm.mov_imm(0, CLOCK_MONOTONIC)
    asm.adr(1, "ts0_sec")
    _syscall(asm, SYS_CLOCK_GETTIME)
    asm.mov(9, 21)
    asm.label("loop")
    asm.ldr_w(10, 20)
    asm.subs_imm(9, 9, 1)
    asm.b_ne("loop")
    asm.mov(23, 10)
    asm.mov_imm(0, CLOCK_MONOTONIC)
    asm.adr(1, "ts1_sec")
    _syscall(asm, SYS_CLOCK_GETTIME)
    asm.adr(9, "ts0_sec")
    asm.ldr_x(10, 9, 0)    # ts0.sec
    asm.ldr_x(11, 9, 8)    # ts0.nsec
    asm.ldr_x(12, 9, 16)   # ts1.sec
    asm.ldr_x(13, 9, 24)   # ts1.nsec
    asm.sub(12, 12, 10)
    asm.sub(13, 13, 11)
    asm.mov_imm(14, NSEC_PER_SEC)
    asm.madd(0, 12, 14, 13)
    asm.mov(30, 22)
    asm.ret()
    return asm


def elf(code: bytes, data: bytes) -> bytes:
    """A static ET_EXEC with one RWX PT_LOAD holding headers, code and data; entry = code."""
    headers = EHDR.size + PHDR.size
    entry = ELF_LOAD_ADDRESS + headers
    image_size = headers + len(code) + len(data)
    ehdr = EHDR.pack(ELF_IDENT, ET_EXEC, EM_AARCH64, EV_CURRENT, entry, EHDR.size, 0, 0,
                     EHDR.size, PHDR.size, 1, 0, 0, 0)
    phdr = PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, 0, ELF_LOAD_ADDRESS, ELF_LOAD_ADDRESS,
                     image_size, image_size, SEGMENT_ALIGN)
    return ehdr + phdr + code + data


def mmio_loop_elf(phys: int, iterations: int) -> bytes:
    """The B3 probe program (module docstring) as ELF bytes."""
    code, data = mmio_loop_program(phys, iterations).assemble()
    return elf(code, data)
