"""The QMP monitor as a QMP client sees it, driven with qemu.qmp.QMPClient."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from vsmmu.qmp import Arg, ErrorClass, QmpCommandError, QmpError, QmpMonitor

PROMPT_S = 5.0

ClientFactory = Callable[[], Awaitable[QMPClient]]


@pytest.fixture
async def connect(monitor: QmpMonitor) -> AsyncIterator[ClientFactory]:
    """Connect negotiated QMPClients to the monitor; all disconnected at teardown."""
    clients: list[QMPClient] = []

    async def factory() -> QMPClient:
        client = QMPClient(f"test-{len(clients)}")
        await client.connect(monitor.socket_path)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.disconnect()


@pytest.fixture
def vsmmu_like(monitor: QmpMonitor) -> QmpMonitor:
    """The monitor with commands shaped like the service's."""

    def query_vsmmu(args: dict[str, Any]) -> dict[str, object]:
        return {"enabled": True, "gerror": 0}

    async def inject(args: dict[str, Any]) -> dict[str, object]:
        await asyncio.sleep(0)
        if args["sid"] > 0xFF:
            raise QmpCommandError(f"StreamID {args['sid']:#x} is out of range (0..0xff)")
        return {"sid": args["sid"], "ssid": args.get("ssid", 0), "write": args["write"]}

    monitor.register("query-vsmmu", query_vsmmu, doc="Report the vSMMU state.")
    monitor.register(
        "x-vsmmu-inject-transaction",
        inject,
        doc="Inject one transaction.",
        args=[Arg("sid", int), Arg("ssid", int, optional=True), Arg("write", bool)],
    )
    return monitor


async def test_greeting_is_qemu_shaped_and_names_vsmmu(connect: ClientFactory) -> None:
    client = await connect()
    greeting = client.greeting
    assert greeting is not None
    version = greeting.QMP.version
    triple = version["qemu"]
    assert isinstance(triple, dict)
    assert {k: type(v) for k, v in triple.items()} == {"major": int, "minor": int, "micro": int}
    assert "vsmmu" in str(version["package"])
    assert list(greeting.QMP.capabilities) == []


async def test_sync_and_async_commands_with_arguments(
    vsmmu_like: QmpMonitor, connect: ClientFactory
) -> None:
    client = await connect()
    assert await client.execute("query-vsmmu") == {"enabled": True, "gerror": 0}
    reply = await client.execute("x-vsmmu-inject-transaction", {"sid": 3, "write": True})
    assert reply == {"sid": 3, "ssid": 0, "write": True}
    reply = await client.execute(
        "x-vsmmu-inject-transaction", {"sid": 3, "ssid": 7, "write": False}
    )
    assert reply == {"sid": 3, "ssid": 7, "write": False}


async def test_decorator_registration_and_none_result(
    monitor: QmpMonitor, connect: ClientFactory
) -> None:
    calls: list[dict[str, Any]] = []

    @monitor.command("x-record", doc="Record the arguments.", args=[Arg("tag", str)])
    def record(args: dict[str, Any]) -> None:
        calls.append(args)

    client = await connect()
    assert await client.execute("x-record", {"tag": "a"}) == {}
    assert calls == [{"tag": "a"}]


@pytest.mark.parametrize(
    ("arguments", "desc"),
    [
        ({"write": True}, "Parameter 'sid' is missing"),
        ({"sid": 1, "write": True, "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"sid": "1", "write": True}, "Invalid parameter type for 'sid', expected: integer"),
        ({"sid": True, "write": True}, "Invalid parameter type for 'sid', expected: integer"),
        ({"sid": 1, "write": 1}, "Invalid parameter type for 'write', expected: boolean"),
        ({"sid": 1 << 64, "write": True}, "Invalid parameter type for 'sid', expected: integer"),
    ],
)
async def test_argument_errors_are_qemu_generic_errors(
    vsmmu_like: QmpMonitor, connect: ClientFactory, arguments: dict[str, object], desc: str
) -> None:
    client = await connect()
    with pytest.raises(ExecuteError) as info:
        await client.execute("x-vsmmu-inject-transaction", arguments)
    assert info.value.error_class == "GenericError"
    assert info.value.error.error.desc == desc


async def test_unknown_command_is_command_not_found(connect: ClientFactory) -> None:
    client = await connect()
    with pytest.raises(ExecuteError) as info:
        await client.execute("query-nothing")
    assert info.value.error_class == "CommandNotFound"
    assert info.value.error.error.desc == "The command query-nothing has not been found"


async def test_second_qmp_capabilities_is_refused(connect: ClientFactory) -> None:
    client = await connect()
    with pytest.raises(ExecuteError) as info:
        await client.execute("qmp_capabilities")
    assert info.value.error_class == "CommandNotFound"
    assert "already complete" in info.value.error.error.desc


async def test_handler_command_error_keeps_message_and_class(
    vsmmu_like: QmpMonitor, connect: ClientFactory
) -> None:
    def find(args: dict[str, Any]) -> None:
        raise QmpCommandError("endpoint 'ep9' not found", ErrorClass.DEVICE_NOT_FOUND)

    vsmmu_like.register("x-find", find, doc="Always fails.")
    client = await connect()
    with pytest.raises(ExecuteError) as info:
        await client.execute("x-vsmmu-inject-transaction", {"sid": 0x100, "write": False})
    assert info.value.error_class == "GenericError"
    assert info.value.error.error.desc == "StreamID 0x100 is out of range (0..0xff)"
    with pytest.raises(ExecuteError) as info:
        await client.execute("x-find")
    assert info.value.error_class == "DeviceNotFound"


async def test_handler_crash_is_logged_and_monitor_survives(
    vsmmu_like: QmpMonitor, connect: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def crash(args: dict[str, Any]) -> None:
        raise ZeroDivisionError("boom")

    vsmmu_like.register("x-crash", crash, doc="Crashes.")
    client = await connect()
    with caplog.at_level(logging.ERROR, logger="vsmmu.qmp"), pytest.raises(ExecuteError) as info:
        await client.execute("x-crash")
    assert info.value.error_class == "GenericError"
    assert "x-crash" in info.value.error.error.desc
    crashed = [r for r in caplog.records if r.exc_info and "x-crash" in r.getMessage()]
    assert crashed, "the crash must be logged with its traceback"
    assert await client.execute("query-vsmmu") == {"enabled": True, "gerror": 0}


async def test_unserialisable_result_is_an_error_not_a_crash(
    monitor: QmpMonitor, connect: ClientFactory
) -> None:
    monitor.register("x-bad", lambda args: {"x": object()}, doc="Returns junk.")
    client = await connect()
    with pytest.raises(ExecuteError) as info:
        await client.execute("x-bad")
    assert "x-bad" in info.value.error.error.desc
    assert await client.execute("query-version") == client.greeting.QMP.version  # type: ignore[union-attr]


async def test_query_commands_lists_registered_commands(
    vsmmu_like: QmpMonitor, connect: ClientFactory
) -> None:
    client = await connect()
    listed = await client.execute("query-commands")
    assert isinstance(listed, list)
    names = {entry["name"] for entry in listed}
    assert {"qmp_capabilities", "query-version", "query-vsmmu"} <= names
    assert "x-vsmmu-inject-transaction" in names


async def test_event_reaches_every_negotiated_client(
    monitor: QmpMonitor, connect: ClientFactory
) -> None:
    first, second = await connect(), await connect()
    monitor.emit("VSMMU_EVENT", {"type": "C_BAD_STE", "sid": 16})
    for client in (first, second):
        event = await asyncio.wait_for(client.events.get(), PROMPT_S)
        assert event["event"] == "VSMMU_EVENT"
        assert event["data"] == {"type": "C_BAD_STE", "sid": 16}
        stamp = event["timestamp"]
        assert isinstance(stamp["seconds"], int) and stamp["seconds"] > 0
        assert 0 <= stamp["microseconds"] < 1_000_000


async def test_event_without_data_and_listener_filter(
    monitor: QmpMonitor, connect: ClientFactory
) -> None:
    from qemu.qmp import EventListener

    client = await connect()
    listener = EventListener(("VSMMU_CERROR",))
    with client.listen(listener):
        monitor.emit("VSMMU_HWPT_ALLOC", {"hwpt": 3})
        monitor.emit("VSMMU_CERROR")
        event = await asyncio.wait_for(listener.get(), PROMPT_S)
    assert event["event"] == "VSMMU_CERROR"
    assert "data" not in event


async def test_emit_from_sync_loop_callback(monitor: QmpMonitor, connect: ClientFactory) -> None:
    client = await connect()
    asyncio.get_running_loop().call_soon(monitor.emit, "VSMMU_EVENT", {"n": 1})
    event = await asyncio.wait_for(client.events.get(), PROMPT_S)
    assert event["data"] == {"n": 1}


async def test_emit_from_another_thread_is_refused(monitor: QmpMonitor) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            monitor.emit("VSMMU_EVENT", {})
        except QmpError as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert len(errors) == 1 and "event loop" in str(errors[0])


async def test_emit_refuses_unserialisable_data(monitor: QmpMonitor) -> None:
    with pytest.raises(QmpError, match="VSMMU_EVENT"):
        monitor.emit("VSMMU_EVENT", {"bad": object()})


def test_registration_errors(socket_dir: str) -> None:
    mon = QmpMonitor(f"{socket_dir}/qmp.sock")
    mon.register("x-a", lambda args: None, doc="A.")
    with pytest.raises(QmpError, match="already registered"):
        mon.register("x-a", lambda args: None, doc="A again.")
    with pytest.raises(QmpError, match="reserved"):
        mon.register("qmp_capabilities", lambda args: None, doc="No.")
    with pytest.raises(QmpError, match="twice"):
        mon.register("x-b", lambda args: None, doc="B.", args=[Arg("n", int), Arg("n", str)])
    with pytest.raises(QmpError, match="expected one of"):
        Arg("f", float)
    with pytest.raises(QmpError, match="empty doc"):
        mon.register("x-c", lambda args: None, doc=" ")
    assert "x-a" in mon.commands and "x-b" not in mon.commands
