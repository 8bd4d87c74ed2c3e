"""The hand-assembled B3 probe: known A64 encodings and a well-formed static ELF."""

from __future__ import annotations

import io
import struct

import pytest
from elftools.elf.elffile import ELFFile

from benchmarks.a64 import Assembler, AssemblyError, mmio_loop_elf
from benchmarks.b3_trap import REPLY_SIZE, REQUEST_SIZE, socket_floor


def words(asm: Assembler) -> list[int]:
    code, _data = asm.assemble()  # code is zero-padded to 8 bytes before the data
    return list(struct.unpack_from(f"<{len(asm.words)}I", code))


def test_known_encodings() -> None:
    asm = Assembler()
    asm.mov_imm(8, 93)          # mov x8, #93
    asm.mov_imm(0, -100)        # movn x0, #99
    asm.mov(0, 1)               # mov x0, x1
    asm.ldr_w(1, 0)             # ldr w1, [x0]
    asm.subs_imm(9, 9, 1)       # subs x9, x9, #1
    asm.svc()
    asm.ret()
    assert words(asm) == [0xD2800BA8, 0x92800C60, 0xAA0103E0, 0xB9400001, 0xF1000529,
                          0xD4000001, 0xD65F03C0]


def test_backward_branch_and_wide_constant() -> None:
    asm = Assembler()
    asm.label("loop")
    asm.subs_imm(9, 9, 1)
    asm.b_ne("loop")            # b.ne -4
    asm.mov_imm(5, 0x0905_0000)  # movz x5, #0x905, lsl #16
    assert words(asm) == [0xF1000529, 0x54FFFFE1, 0xD2A120A5]


def test_out_of_range_operand_is_refused() -> None:
    asm = Assembler()
    with pytest.raises(AssemblyError, match="SUBS immediate"):
        asm.subs_imm(0, 0, 1 << 12)


def test_probe_is_a_static_aarch64_executable() -> None:
    image = mmio_loop_elf(0x0905_0000, 1000)
    elf = ELFFile(io.BytesIO(image))
    assert elf["e_machine"] == "EM_AARCH64" and elf["e_type"] == "ET_EXEC"
    (segment,) = list(elf.iter_segments())
    assert segment["p_type"] == "PT_LOAD" and segment["p_filesz"] == len(image)
    assert segment["p_vaddr"] <= elf["e_entry"] < segment["p_vaddr"] + segment["p_memsz"]
    assert b"/dev/mem\0" in image


def test_socket_floor_is_a_positive_round_trip() -> None:
    assert REPLY_SIZE == REQUEST_SIZE + 4
    assert 0 < socket_floor(50) < 10_000
