"""Fixtures for the QMP monitor tests: a started monitor and a raw-socket client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from vsmmu.qmp import QmpMonitor

#: How long a test waits for anything the monitor should do at once.
PROMPT_S = 5.0


@pytest.fixture
def socket_dir() -> Iterator[str]:
    """A short private directory: unix socket paths are limited to 107 bytes."""
    path = tempfile.mkdtemp(prefix="qmp-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def monitor(socket_dir: str) -> AsyncIterator[QmpMonitor]:
    """A started monitor with no commands beyond the built-ins."""
    mon = QmpMonitor(os.path.join(socket_dir, "qmp.sock"))
    await mon.start()
    yield mon
    await mon.close()


class RawQmp:
    """A byte-level QMP client for the inputs a well-behaved library never sends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.greeting: dict[str, Any] = {}

    @classmethod
    async def connect(cls, path: str) -> RawQmp:
        """Connect and read the greeting."""
        reader, writer = await asyncio.open_unix_connection(path)
        client = cls(reader, writer)
        client.greeting = await client.recv()
        return client

    async def send_bytes(self, data: bytes) -> None:
        """Write raw bytes."""
        self.writer.write(data)
        await self.writer.drain()

    async def send(self, message: object) -> None:
        """Write one JSON value, newline-terminated."""
        await self.send_bytes(json.dumps(message).encode() + b"\n")

    async def recv(self) -> dict[str, Any]:
        """Read one server message (the server ends each with CRLF)."""
        line = await asyncio.wait_for(self.reader.readline(), PROMPT_S)
        assert line, "server closed the connection"
        assert line.endswith(b"\r\n"), f"server message not CRLF-terminated: {line!r}"
        message = json.loads(line)
        assert isinstance(message, dict)
        return message

    async def execute(self, name: str, **kwargs: object) -> dict[str, Any]:
        """Send ``{"execute": name, **kwargs}`` and return the reply."""
        await self.send({"execute": name, **kwargs})
        return await self.recv()

    async def negotiate(self) -> None:
        """Enter command mode."""
        assert await self.execute("qmp_capabilities") == {"return": {}}

    async def at_eof(self) -> bool:
        """True if the server has closed the connection (after any pending output)."""
        data = await asyncio.wait_for(self.reader.read(), PROMPT_S)
        return data == b"" or self.reader.at_eof()

    async def close(self) -> None:
        """Close the connection."""
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


RawConnect = Callable[[], Awaitable[RawQmp]]


@pytest.fixture
async def raw_connect(monitor: QmpMonitor) -> AsyncIterator[RawConnect]:
    """A factory of raw clients connected to ``monitor`` (in negotiation mode)."""
    clients: list[RawQmp] = []

    async def connect() -> RawQmp:
        client = await RawQmp.connect(monitor.socket_path)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        await client.close()


@pytest.fixture
async def raw_client(raw_connect: RawConnect) -> RawQmp:
    """A raw client connected to ``monitor``, still in negotiation mode."""
    return await raw_connect()
