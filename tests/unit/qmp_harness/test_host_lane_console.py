"""The host lane's console reader: lines of any length, as the command printed them."""

from __future__ import annotations

import asyncio

from qmp_harness.host_lane.lane import CONSOLE_CHUNK, console_lines


async def lines_of(data: bytes) -> list[bytes]:
    stream = asyncio.StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    return [line async for line in console_lines(stream)]


async def test_a_line_longer_than_readlines_limit_comes_whole() -> None:
    # StreamReader.readline refuses a line past 64 KiB; a command's JSON record is one line.
    long = b"[" + b"x" * (5 * CONSOLE_CHUNK + 17) + b"]\n"
    assert await lines_of(b"first\n" + long + b"last") == [b"first\n", long, b"last"]


async def test_lines_split_across_reads_are_joined() -> None:
    data = b"".join(b"line %d\n" % i for i in range(20_000))
    assert await lines_of(data) == data.splitlines(keepends=True)
