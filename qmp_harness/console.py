"""The guest's serial console over a unix socket: wait for output, run shell commands.

The whole transcript is kept (``Console.transcript``) for failure reports.
:meth:`Console.wait_for` searches from a cursor that advances past each match,
so successive waits see successive output (a reboot prints its banner again
and the next wait finds the new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

PANIC_PATTERN = re.compile(r"Kernel panic - not syncing[^\n]*")
"""Seeing this aborts every wait: the guest will not answer any more."""

TAIL_LINES = 50
READ_CHUNK = 65536


class ConsoleError(RuntimeError):
    """The console timed out, closed, or the guest panicked while waiting."""


class Console:
    """A connected serial console.  Create with :meth:`connect`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._buffer = ""
        self._cursor = 0
        self._changed = asyncio.Condition()
        self._closed = False
        self._commands = 0
        self._pump = asyncio.create_task(self._read_forever(), name="console-reader")

    @classmethod
    async def connect(cls, path: Path) -> Console:
        """Connect to the console socket at ``path`` (raises OSError if it is not there)."""
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    @property
    def transcript(self) -> str:
        """Everything the guest printed so far (carriage returns removed)."""
        return self._buffer

    def tail(self, lines: int = TAIL_LINES) -> str:
        """The last ``lines`` lines of the transcript."""
        return "\n".join(self._buffer.splitlines()[-lines:])

    async def _read_forever(self) -> None:
        try:
            while True:
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    break
                text = chunk.decode(errors="replace").replace("\r", "")
                log.debug("console: %r", text)
                async with self._changed:
                    self._buffer += text
                    self._changed.notify_all()
        except (ConnectionError, OSError) as exc:
            log.debug("console read ended: %s", exc)
        finally:
            async with self._changed:
                self._closed = True
                self._changed.notify_all()

    def mark(self) -> None:
        """Move the search cursor to the end of the output seen so far."""
        self._cursor = len(self._buffer)

    async def wait_for(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until ``pattern`` appears after the cursor; return the match.

        The cursor moves past the match.  Raises ConsoleError on timeout, when
        the console closes, or when the guest panics first.
        """
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern

        def search() -> re.Match[str] | None:
            return regex.search(self._buffer, self._cursor)

        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    while True:
                        match = search()
                        if match is not None:
                            self._cursor = match.end()
                            return match
                        panic = PANIC_PATTERN.search(self._buffer, self._cursor)
                        if panic is not None:
                            raise ConsoleError(
                                f"guest panicked while waiting for {regex.pattern!r}: "
                                f"{panic.group(0)}"
                            )
                        if self._closed:
                            raise ConsoleError(
                                f"console closed while waiting for {regex.pattern!r}"
                            )
                        await self._changed.wait()
        except TimeoutError:
            raise ConsoleError(
                f"console: {regex.pattern!r} did not appear within {timeout}s"
            ) from None

    async def write(self, text: str) -> None:
        """Type ``text`` on the console."""
        self._writer.write(text.encode())
        await self._writer.drain()

    async def run(self, command: str, timeout: float = 30.0) -> tuple[str, int]:
        """Run ``command`` in the guest shell; return its output (stdout+stderr) and status.

        The markers are printed with printf from split words, so the shell's
        echo of the command line never matches them.
        Raises ConsoleError on timeout.
        """
        self._commands += 1
        n = self._commands
        begin, end = f"VSMMU-BEGIN-{n}", f"VSMMU-END-{n}"
        self.mark()
        await self.write(
            f"printf '%s-%s\\n' VSMMU-BEGIN {n}; {{ {command} ; }} 2>&1; "
            f"printf '%s-%s-%s\\n' VSMMU-END {n} $?\n"
        )
        match = await self.wait_for(
            re.compile(rf"{begin}\n(.*?){end}-(\d+)\n", re.DOTALL), timeout
        )
        return match.group(1), int(match.group(2))

    async def close(self) -> None:
        """Close the connection and stop the reader."""
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
