"""The QMP monitor on the wire: negotiation, hostile input, flow control, lifecycle."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
from qemu.qmp import QMPClient

from vsmmu.qmp import QmpError, QmpMonitor, QmpTransportError
from vsmmu.qmp.transport import MAX_MESSAGE_BYTES, MAX_NESTING

PROMPT_S = 5.0


def generic(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


# -- negotiation ------------------------------------------------------------------------


async def test_commands_before_negotiation_are_command_not_found(raw_client: Any) -> None:
    for name in ("query-version", "no-such-command"):
        reply = await raw_client.execute(name, id=name)
        assert reply == {
            "error": {
                "class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'",
            },
            "id": name,
        }
    await raw_client.negotiate()
    reply = await raw_client.execute("query-version", id=7)
    assert reply == {"return": raw_client.greeting["QMP"]["version"], "id": 7}


async def test_unoffered_capability_is_refused_and_mode_unchanged(raw_client: Any) -> None:
    reply = await raw_client.execute("qmp_capabilities", arguments={"enable": ["oob"]})
    assert reply == generic("Capability oob not available")
    reply = await raw_client.execute("query-version")
    assert reply["error"]["class"] == "CommandNotFound"
    await raw_client.negotiate()


async def test_events_wait_for_negotiation(monitor: QmpMonitor, raw_client: Any) -> None:
    monitor.emit("EARLY", {})
    await raw_client.negotiate()  # the reply must be the next message, not EARLY
    monitor.emit("LATE", {"n": 1})
    event = await raw_client.recv()
    assert event["event"] == "LATE" and event["data"] == {"n": 1}


async def test_id_is_echoed_whatever_its_type(monitor: QmpMonitor, raw_client: Any) -> None:
    await raw_client.negotiate()
    for request_id in (1, "abc", [1, {"x": None}], None):
        reply = await raw_client.execute("query-version", id=request_id)
        assert reply["id"] == request_id
    reply = await raw_client.execute("nope", id={"k": 2})
    assert reply["id"] == {"k": 2} and reply["error"]["class"] == "CommandNotFound"


# -- malformed input keeps the connection ---------------------------------------------------


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b'{"execute": }\n', "JSON parse error, expecting value"),
        (b"[1, 2]\n", "QMP input must be a JSON object"),
        (b"42\n", "QMP input must be a JSON object"),
        (b'{"arguments": {}}\n', "QMP input lacks member 'execute'"),
        (b'{"execute": 1}\n', "QMP input member 'execute' must be a string"),
        (b'{"execute": "x", "arguments": []}\n', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "x", "foo": 1}\n', "QMP input member 'foo' is unexpected"),
        (b'{"exec-oob": "query-version"}\n', "QMP input member 'exec-oob' is unexpected"),
        (b'{"execute": "x", "arguments": {"v": NaN}}\n', "JSON parse error, invalid keyword 'NaN'"),
    ],
)
async def test_malformed_requests_get_qemu_errors(raw_client: Any, data: bytes, desc: str) -> None:
    await raw_client.negotiate()
    await raw_client.send_bytes(data)
    assert await raw_client.recv() == generic(desc)
    assert "return" in await raw_client.execute("query-version")


async def test_garbage_bytes_resynchronise(raw_client: Any) -> None:
    await raw_client.negotiate()
    # An unfinished object cut short by a control byte, then bytes never valid in UTF-8.
    await raw_client.send_bytes(b'{"execute": "query-ver\x01')
    first = await raw_client.recv()
    assert first["error"]["class"] == "GenericError"
    assert first["error"]["desc"].startswith("JSON parse error")
    await raw_client.send_bytes(b"\xff\xfe")
    for _ in range(2):
        reply = await raw_client.recv()
        assert reply["error"]["desc"].startswith("JSON parse error")
    assert "return" in await raw_client.execute("query-version")


async def test_messages_without_separators_and_split_across_writes(raw_client: Any) -> None:
    await raw_client.negotiate()
    # qemu.qmp writes objects back to back with no newline.
    await raw_client.send_bytes(
        b'{"execute":"query-version","id":1}{"execute":"query-version","id":2}'
    )
    assert [(await raw_client.recv())["id"] for _ in range(2)] == [1, 2]
    # One message dribbled a byte at a time, with braces and an escaped quote in a string.
    message = json.dumps({"execute": "nope", "id": 'a}"\\{['}).encode()
    for i in range(len(message)):
        await raw_client.send_bytes(message[i : i + 1])
    reply = await raw_client.recv()
    assert reply["id"] == 'a}"\\{[' and reply["error"]["class"] == "CommandNotFound"


async def test_oversized_message_is_an_error_then_disconnect(raw_client: Any) -> None:
    await raw_client.negotiate()
    huge = b'{"execute": "x", "id": "' + b"a" * (MAX_MESSAGE_BYTES + 1) + b'"}'
    raw_client.writer.write(huge)
    reply = await raw_client.recv()
    assert reply["error"]["class"] == "GenericError"
    assert str(MAX_MESSAGE_BYTES) in reply["error"]["desc"]
    assert await raw_client.at_eof()


async def test_too_deep_nesting_is_an_error_then_disconnect(raw_client: Any) -> None:
    await raw_client.negotiate()
    await raw_client.send_bytes(b"[" * (MAX_NESTING + 1))
    reply = await raw_client.recv()
    assert "nesting" in reply["error"]["desc"]
    assert await raw_client.at_eof()


async def test_deep_but_legal_nesting_is_answered(raw_client: Any) -> None:
    await raw_client.negotiate()
    # The request object and its arguments object are two of the levels.
    inner = MAX_NESTING - 2
    nested = b"[" * inner + b"]" * inner
    await raw_client.send_bytes(b'{"execute": "nope", "arguments": {"a": ' + nested + b"}}")
    reply = await raw_client.recv()
    assert reply["error"]["class"] in ("GenericError", "CommandNotFound")
    assert "return" in await raw_client.execute("query-version")


# -- concurrency, disconnects, flow control ----------------------------------------------------


async def test_client_leaving_mid_command_does_not_disturb_others(
    monitor: QmpMonitor, raw_connect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    started, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def slow(args: dict[str, Any]) -> dict[str, int]:
        started.set()
        await release.wait()
        finished.set()
        return {"done": 1}

    monitor.register("x-slow", slow, doc="Waits to be released.")
    leaver, stayer = await raw_connect(), await raw_connect()
    await leaver.negotiate()
    await stayer.negotiate()
    with caplog.at_level(logging.ERROR):
        await leaver.send({"execute": "x-slow"})
        await asyncio.wait_for(started.wait(), PROMPT_S)
        await leaver.close()
        assert "return" in await stayer.execute("query-version")
        release.set()
        await asyncio.wait_for(finished.wait(), PROMPT_S)
        monitor.emit("AFTER", {})
        assert (await stayer.recv())["event"] == "AFTER"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_clients_commands_interleave_across_clients(
    monitor: QmpMonitor, raw_connect: Any
) -> None:
    gate = asyncio.Event()

    async def wait_gate(args: dict[str, Any]) -> str:
        await gate.wait()
        return "opened"

    monitor.register("x-wait", wait_gate, doc="Waits for the gate.")
    blocked, other = await raw_connect(), await raw_connect()
    await blocked.negotiate()
    await other.negotiate()
    await blocked.send({"execute": "x-wait", "id": "w"})
    # Another client is served while the first one's command is pending.
    assert "return" in await other.execute("query-version")
    gate.set()
    assert await blocked.recv() == {"return": "opened", "id": "w"}


async def test_stuck_client_loses_events_without_blocking_others(
    socket_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    depth = 8
    async with QmpMonitor(f"{socket_dir}/qmp.sock", event_queue_depth=depth) as mon:
        stuck_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stuck_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck_sock.connect(mon.socket_path)
        stuck_sock.sendall(b'{"execute": "qmp_capabilities"}')
        fast = QMPClient("fast")
        await fast.connect(mon.socket_path)
        while mon.client_count < 2:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # let the stuck client's negotiation be processed
        payload = {"blob": "x" * 65536}
        total = 200
        with caplog.at_level(logging.WARNING, logger="vsmmu.qmp"):
            for n in range(total):
                t0 = time.monotonic()
                mon.emit("BULK", {"n": n, **payload})
                assert time.monotonic() - t0 < 0.5, "emit must never wait for a client"
                if n % depth == depth - 1:
                    for _ in range(depth):
                        event = await asyncio.wait_for(fast.events.get(), PROMPT_S)
                        assert event["data"]["n"] == n - depth + 1 + _
        assert any("dropping events" in r.getMessage() for r in caplog.records)
        await fast.disconnect()
        t0 = time.monotonic()
    # Leaving the context closed the monitor despite the client that never reads.
    assert time.monotonic() - t0 < PROMPT_S
    stuck_sock.close()


# -- lifecycle -------------------------------------------------------------------------------


async def test_connect_disconnect_cycles_leak_no_fds_or_tasks(
    open_fds: Callable[[], int], monitor: QmpMonitor
) -> None:
    async def settle() -> None:
        for _ in range(50):
            if monitor.client_count == 0:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)

    # Warm up once so lazily created loop resources are not counted as leaks.
    warm = QMPClient("warm")
    await warm.connect(monitor.socket_path)
    await warm.disconnect()
    await settle()
    fds, tasks = open_fds(), len(asyncio.all_tasks())
    for i in range(100):
        if i % 2:
            client = QMPClient(f"c{i}")
            await client.connect(monitor.socket_path)
            await client.execute("query-version")
            await client.disconnect()
        else:
            reader, writer = await asyncio.open_unix_connection(monitor.socket_path)
            await reader.readline()
            writer.write(b'{"execute": "qmp_capa')  # leave mid-message
            writer.close()
            await writer.wait_closed()
    await settle()
    assert monitor.client_count == 0
    assert open_fds() == fds
    assert len(asyncio.all_tasks()) == tasks


async def test_close_disconnects_clients_cancels_commands_and_removes_socket(
    socket_dir: str,
) -> None:
    cancelled = asyncio.Event()
    started = asyncio.Event()

    async def forever(args: dict[str, Any]) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    mon = QmpMonitor(f"{socket_dir}/qmp.sock")
    mon.register("x-forever", forever, doc="Never returns.")
    await mon.start()
    assert os.path.exists(mon.socket_path)
    reader, writer = await asyncio.open_unix_connection(mon.socket_path)
    await reader.readline()
    writer.write(b'{"execute": "qmp_capabilities"}{"execute": "x-forever"}')
    await reader.readline()
    await asyncio.wait_for(started.wait(), PROMPT_S)
    await asyncio.wait_for(mon.close(), PROMPT_S)
    assert cancelled.is_set()
    assert await asyncio.wait_for(reader.read(), PROMPT_S) == b""
    assert not os.path.exists(mon.socket_path)
    await mon.close()  # idempotent
    writer.close()


async def test_stale_socket_is_replaced_live_one_is_refused(socket_dir: str) -> None:
    path = f"{socket_dir}/qmp.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    async with QmpMonitor(path) as first:
        client = QMPClient("c")
        await client.connect(path)
        await client.disconnect()
        with pytest.raises(QmpTransportError, match="another process"):
            await QmpMonitor(path).start()
        assert first.client_count == 0
    assert not os.path.exists(path)


async def test_path_that_is_not_a_socket_is_refused(socket_dir: str) -> None:
    path = f"{socket_dir}/regular"
    with open(path, "w") as f:
        f.write("keep me")
    with pytest.raises(QmpTransportError, match="not a socket"):
        await QmpMonitor(path).start()
    with open(path) as f:
        assert f.read() == "keep me"


async def test_emit_with_no_clients_is_harmless(monitor: QmpMonitor) -> None:
    monitor.emit("NOBODY", {"x": 1})
    with pytest.raises(QmpError):
        monitor.emit("", {})
