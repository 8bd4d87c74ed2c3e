"""Console.run against a scripted guest shell whose output kernel messages cut into."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
from collections.abc import AsyncIterator, Callable

import pytest

from qmp_harness.console import (
    Console,
    ConsoleError,
    decode_output,
    strip_kernel_records,
)

RECORD = "[    2.584159] arm-smmu-v3 10000000.smmuv3: event: C_BAD_STE client: x sid: 0x10\n"
COMMAND_LINE = re.compile(rb"VSMMU-BEGIN (\d+); .*VSMMU-END")


class ScriptedShell:
    """The guest side of the serial line: answers each command with chosen raw text."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def answer(self, make_reply: Callable[[int], str]) -> None:
        """Read one command line, then send ``make_reply(n)`` in small pieces."""
        loop = asyncio.get_running_loop()
        line = b""
        while not line.endswith(b"\n"):
            line += await loop.sock_recv(self.sock, 4096)
        match = COMMAND_LINE.search(line)
        assert match is not None, line
        reply = make_reply(int(match.group(1))).encode()
        for start in range(0, len(reply), 7):  # the serial line delivers pieces
            await loop.sock_sendall(self.sock, reply[start:start + 7])


@pytest.fixture
async def console() -> AsyncIterator[tuple[Console, ScriptedShell]]:
    ours, guest = socket.socketpair()
    guest.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    con = Console(reader, writer)
    yield con, ScriptedShell(guest)
    await con.close()
    guest.close()


def encoded(text: str) -> str:
    """What busybox ``base64`` prints for ``text`` (76-column lines)."""
    data = base64.b64encode(text.encode()).decode()
    return "".join(data[i:i + 76] + "\n" for i in range(0, len(data), 76))


async def test_run_returns_output_and_status_with_kernel_records_cutting_in(
    console: tuple[Console, ScriptedShell],
) -> None:
    con, shell = console
    output = "[    1.000000] a dmesg line the command printed\n" + "x" * 200 + "\n"
    body = encoded(output)

    def reply(n: int) -> str:
        # Kernel records land inside the begin marker, inside the encoded body and
        # inside the end marker, as they did on the 7.3 guest.
        return (f"~ # VSMMU-BEGIN-{n}{RECORD}\n{body[:30]}{RECORD}{body[30:]}"
                f"VSMMU-END-{n}-{RECORD}3\n~ # ")

    answer = asyncio.create_task(shell.answer(reply))
    text, status = await con.run("dmesg", timeout=5)
    await answer
    assert (text, status) == (output, 3)


async def test_run_keeps_kernel_records_out_of_output_and_next_wait_sees_later_text(
    console: tuple[Console, ScriptedShell],
) -> None:
    con, shell = console
    answer = asyncio.create_task(shell.answer(
        lambda n: f"VSMMU-BEGIN-{n}\n{RECORD}{encoded('ok')}VSMMU-END-{n}-0\nAFTER-MARK\n"))
    assert await con.run("true", timeout=5) == ("ok", 0)
    await answer
    assert (await con.wait_for("AFTER-MARK", timeout=5)).group(0) == "AFTER-MARK"


async def test_run_rejects_output_that_is_not_base64(
    console: tuple[Console, ScriptedShell],
) -> None:
    con, shell = console
    answer = asyncio.create_task(shell.answer(
        lambda n: f"VSMMU-BEGIN-{n}\nnot base64!\nVSMMU-END-{n}-0\n"))
    with pytest.raises(ConsoleError, match="not base64"):
        await con.run("true", timeout=5)
    await answer


def test_strip_kernel_records_maps_offsets_back_past_removed_records() -> None:
    raw = f"ab{RECORD}cd{RECORD}{RECORD}ef"
    clean, to_raw = strip_kernel_records(raw)
    assert clean == "abcdef"
    assert [raw[to_raw(i)] for i in range(len(clean))] == list(clean)
    assert to_raw(len(clean)) == len(raw)


def test_strip_kernel_records_leaves_a_partial_record_alone() -> None:
    clean, _ = strip_kernel_records("VSMMU-END-1-0[    2.58")
    assert clean == "VSMMU-END-1-0[    2.58"


def test_decode_output_ignores_line_breaks() -> None:
    assert decode_output(encoded("é" * 100)) == "é" * 100
