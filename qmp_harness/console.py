"""The guest's serial console over a unix socket: wait for output, run shell commands.

The whole transcript is kept (``Console.transcript``) for failure reports.
:meth:`Console.wait_for` searches from a cursor that advances past each match,
so successive waits see successive output (a reboot prints its banner again
and the next wait finds the new one).

The kernel writes its console messages to the same serial line as the
shell, whenever they happen, so a message can land in the middle of a
command's output (newer arm-smmu-v3 drivers print events at error level,
above the ``loglevel=`` threshold).  :meth:`Console.run` therefore has the
guest send the output base64-encoded between markers, removes every whole
kernel record (``[ seconds] text``) from that stretch, and decodes the rest:
base64 has no ``[``, so nothing of the command's output can be mistaken for
a kernel record.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import re
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

PANIC_PATTERN = re.compile(r"Kernel panic - not syncing[^\n]*")
"""Seeing this aborts every wait: the guest will not answer any more."""

TAIL_LINES = 50
READ_CHUNK = 65536
KERNEL_RECORD = re.compile(r"\[\s*\d+\.\d+\] [^\n]*\n")
"""One kernel console message as printk writes it (with ``printk.time``), newline included."""
OUTPUT_FILE = "/tmp/.vsmmu-console-output"
"""Where the guest shell collects a command's output before sending it encoded."""


def strip_kernel_records(text: str) -> tuple[str, Callable[[int], int]]:
    """Remove whole kernel records from ``text``.

    Returns the remaining text and a function mapping an offset in it to the
    offset in ``text`` (past any record removed there).
    """
    spans = [m.span() for m in KERNEL_RECORD.finditer(text)]
    if not spans:
        return text, lambda offset: offset
    pieces: list[str] = []
    kept_starts: list[tuple[int, int]] = []  # (offset in result, offset in text)
    position = 0
    for start, end in spans:
        kept_starts.append((sum(map(len, pieces)), position))
        pieces.append(text[position:start])
        position = end
    kept_starts.append((sum(map(len, pieces)), position))
    pieces.append(text[position:])

    def to_raw(offset: int) -> int:
        clean_start, raw_start = next(
            (c, r) for c, r in reversed(kept_starts) if c <= offset)
        return raw_start + offset - clean_start

    return "".join(pieces), to_raw


def decode_output(encoded: str) -> str:
    """Decode the base64 text a command's output was sent as.

    Raises ConsoleError if it is not base64 (something else wrote into it).
    """
    try:
        raw = base64.b64decode("".join(encoded.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConsoleError(
            f"console: command output {encoded[:200]!r} is not base64 ({exc}); "
            "expected only the encoded output between the markers") from None
    return raw.decode(errors="replace")


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

        def search() -> tuple[re.Match[str], int] | None:
            match = regex.search(self._buffer, self._cursor)
            return None if match is None else (match, match.end())

        return await self._wait(search, regex.pattern, timeout)

    async def _wait_without_kernel_records(self, regex: re.Pattern[str],
                                           timeout: float) -> re.Match[str]:
        """Like :meth:`wait_for`, on the output after the cursor without kernel records."""
        def search() -> tuple[re.Match[str], int] | None:
            clean, to_raw = strip_kernel_records(self._buffer[self._cursor:])
            match = regex.search(clean)
            return None if match is None else (match, self._cursor + to_raw(match.end()))

        return await self._wait(search, regex.pattern, timeout)

    async def _wait(self, search: Callable[[], tuple[re.Match[str], int] | None],
                    what: str, timeout: float) -> re.Match[str]:
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    while True:
                        found = search()
                        if found is not None:
                            match, self._cursor = found
                            return match
                        panic = PANIC_PATTERN.search(self._buffer, self._cursor)
                        if panic is not None:
                            raise ConsoleError(
                                f"guest panicked while waiting for {what!r}: "
                                f"{panic.group(0)}"
                            )
                        if self._closed:
                            raise ConsoleError(f"console closed while waiting for {what!r}")
                        await self._changed.wait()
        except TimeoutError:
            raise ConsoleError(f"console: {what!r} did not appear within {timeout}s") from None

    async def write(self, text: str) -> None:
        """Type ``text`` on the console."""
        self._writer.write(text.encode())
        await self._writer.drain()

    async def run(self, command: str, timeout: float = 30.0) -> tuple[str, int]:
        """Run ``command`` in the guest shell; return its output (stdout+stderr) and status.

        The output is collected in :data:`OUTPUT_FILE` and sent base64-encoded
        once the command is done (module docstring), so kernel messages on
        the console never mix into it.  The markers are printed with printf
        from split words, so the shell's echo of the command line never
        matches them.  Raises ConsoleError on timeout or undecodable output.
        """
        self._commands += 1
        n = self._commands
        begin, end = f"VSMMU-BEGIN-{n}", f"VSMMU-END-{n}"
        self.mark()
        await self.write(
            f"{{ {command} ; }} > {OUTPUT_FILE} 2>&1; vsmmu_status=$?; "
            f"printf '%s-%s\\n' VSMMU-BEGIN {n}; base64 {OUTPUT_FILE}; "
            f"printf '%s-%s-%s\\n' VSMMU-END {n} $vsmmu_status\n"
        )
        match = await self._wait_without_kernel_records(
            re.compile(rf"{begin}\n(.*?){end}-(\d+)\n", re.DOTALL), timeout
        )
        return decode_output(match.group(1)), int(match.group(2))

    async def close(self) -> None:
        """Close the connection and stop the reader."""
        self._writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self._writer.wait_closed()
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
