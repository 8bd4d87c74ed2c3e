"""Protocol layer of the QMP monitor: greeting, negotiation, dispatch, events.

Everything here is QMP as ``docs/interop/qmp-spec.rst`` specifies it and as
QEMU's ``monitor/qmp.c`` and ``qapi/qmp-dispatch.c`` answer it; sockets and
framing are :mod:`vsmmu.qmp.transport`'s business.

Behaviour worth knowing:

* A client starts in capabilities-negotiation mode, where every command but
  ``qmp_capabilities`` fails with ``CommandNotFound``; no events are sent to
  it until it has negotiated.  No capability (not even ``oob``) is offered.
* Commands of one client run one after the other, in arrival order; commands
  of different clients interleave only where an async handler awaits.
* Input errors (bad JSON, not an object, bad members) are answered with a
  ``GenericError`` and the connection stays usable.  Input too long or nested
  too deep is answered with a ``GenericError`` and the connection is closed.
* Events are encoded once and offered to each negotiated client's bounded
  queue; a client whose queue is full loses the event.  The first loss of a
  run is logged as a warning, and the count when delivery resumes or the
  client leaves.  Events are never buffered without bound and ``emit`` never
  waits.
* Built-in commands: ``qmp_capabilities``, ``query-version``,
  ``query-commands``.  There is no ``quit``: the service decides its life.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Final, TypeVar

from vsmmu.qmp.errors import ErrorClass, QmpCommandError, QmpError, QmpFramingError
from vsmmu.qmp.schema import Arg, check_arg_specs, validate_arguments
from vsmmu.qmp.transport import (
    MAX_CLIENTS,
    MAX_MESSAGE_BYTES,
    OUTBOUND_QUEUE_DEPTH,
    QmpChannel,
    QmpListener,
)

LOG = logging.getLogger(__name__)

#: What a handler receives: the validated ``arguments`` object.
Arguments = dict[str, Any]
#: A command handler: sync or async, returns a JSON-able value (None means ``{}``).
Handler = Callable[[Arguments], object]
_H = TypeVar("_H", bound=Handler)

CAPABILITIES_COMMAND: Final = "qmp_capabilities"
_PACKAGE: Final = "vsmmu"
_LINE_END: Final = "\r\n"  # the spec: server output always ends in CRLF


def _version_triple(text: str) -> dict[str, int]:
    """Turn "0.1.0" (or "0.1.0.dev3") into QEMU's {major, minor, micro}."""
    parts = [int(m) for m in re.findall(r"\d+", text)[:3]]
    parts += [0] * (3 - len(parts))
    return {"major": parts[0], "minor": parts[1], "micro": parts[2]}


def package_version_info() -> dict[str, object]:
    """The ``version`` object of the greeting and of ``query-version``.

    Shaped as QEMU's ``VersionInfo``; the numbers are vsmmu's own package
    version and ``package`` says "vsmmu" so no client mistakes us for QEMU.
    """
    try:
        text = metadata.version(_PACKAGE)
    except metadata.PackageNotFoundError:
        text = "0.0.0"
    return {"qemu": _version_triple(text), "package": f"{_PACKAGE} {text}"}


@dataclass(frozen=True)
class Command:
    """A registered command: what the registry knows about it."""

    name: str
    handler: Handler
    doc: str
    args: tuple[Arg, ...]


@dataclass(eq=False)
class _Session:
    """One client as the protocol sees it."""

    channel: QmpChannel
    negotiated: bool = False
    dropped_events: int = 0


class _RequestError(Exception):
    """A request failed before or inside its command; becomes an error response."""

    def __init__(self, error_class: ErrorClass, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


def _reject_constant(name: str) -> object:
    # Python's json accepts NaN/Infinity; JSON and QEMU do not.
    raise ValueError(f"invalid keyword '{name}'")


def _parse_error_desc(exc: Exception) -> str:
    if isinstance(exc, json.JSONDecodeError):
        detail = exc.msg
    elif isinstance(exc, RecursionError):
        detail = "nesting too deep"
    else:
        detail = str(exc)
    return f"JSON parse error, {detail[:1].lower()}{detail[1:]}"


class QmpMonitor:
    """A QMP server on a unix socket, with a command registry and event emission.

    :param socket_path: where to create the socket.
    :param version: the greeting's ``version`` object; by default
        :func:`package_version_info`.
    :param event_queue_depth: messages that may wait per client before events
        to it are dropped.
    :param max_message_bytes: longest input message; a longer one is
        answered with an error and the client is disconnected.
    :param max_clients: clients served at once; one more receives a
        ``GenericError`` ("too many QMP clients") instead of the greeting and
        is disconnected.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        version: Mapping[str, object] | None = None,
        event_queue_depth: int = OUTBOUND_QUEUE_DEPTH,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_clients: int = MAX_CLIENTS,
    ) -> None:
        self._version = dict(version) if version is not None else package_version_info()
        refusal = self._error_reply(
            ErrorClass.GENERIC_ERROR,
            f"too many QMP clients: {max_clients} are connected, the monitor's limit")
        self._listener = QmpListener(
            socket_path,
            self._serve,
            max_message=max_message_bytes,
            queue_depth=event_queue_depth,
            max_clients=max_clients,
            refusal=refusal,
        )
        self._commands: dict[str, Command] = {}
        self._sessions: set[_Session] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._decoder = json.JSONDecoder(parse_constant=_reject_constant)
        self.register(
            "query-version", self._query_version, doc="Return the service's version object."
        )
        self.register(
            "query-commands",
            self._query_commands,
            doc="List the commands this monitor accepts, as [{'name': ...}].",
        )

    # -- registry ---------------------------------------------------------------

    def register(self, name: str, handler: Handler, *, doc: str, args: Sequence[Arg] = ()) -> None:
        """Make ``name`` executable by clients in command mode.

        :param handler: called with the validated arguments dict; may be a
            plain function or a coroutine function.  It returns a JSON-able
            value (None is answered as ``{}``) or raises
            :class:`~vsmmu.qmp.errors.QmpCommandError`.
        :param doc: one line for people: what the command does.
        :param args: the accepted arguments; anything else is refused before
            the handler runs.
        :raise QmpError: the name is empty, reserved or taken, ``handler`` is
            not callable, ``doc`` is empty or ``args`` repeats a name.
        """
        if not name or name == CAPABILITIES_COMMAND:
            raise QmpError(f"command name {name!r} is reserved or empty; expected a free name")
        if name in self._commands:
            raise QmpError(f"command {name!r} is already registered; expected a new name")
        if not callable(handler):
            raise QmpError(f"handler for command {name!r} is {handler!r}; expected a callable")
        if not doc.strip():
            raise QmpError(f"command {name!r} has an empty doc; expected one line for people")
        check_arg_specs(name, args)
        self._commands[name] = Command(name, handler, doc.strip(), tuple(args))

    def command(self, name: str, *, doc: str, args: Sequence[Arg] = ()) -> Callable[[_H], _H]:
        """Decorator form of :meth:`register`."""

        def decorate(handler: _H) -> _H:
            self.register(name, handler, doc=doc, args=args)
            return handler

        return decorate

    @property
    def commands(self) -> Mapping[str, Command]:
        """The registered commands by name (built-ins included, qmp_capabilities not)."""
        return dict(self._commands)

    # -- lifecycle ----------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        """Path of the monitor's unix socket."""
        return self._listener.path

    @property
    def client_count(self) -> int:
        """Clients connected now, negotiated or not."""
        return len(self._sessions)

    async def start(self) -> None:
        """Create the socket and start serving.

        :raise QmpTransportError: see :meth:`QmpListener.start`.
        :raise OSError: the socket cannot be created.
        """
        self._loop = asyncio.get_running_loop()
        await self._listener.start()

    async def close(self) -> None:
        """Disconnect every client, cancel in-flight commands, remove the socket file.

        Idempotent; never raises except ``CancelledError``.
        """
        await self._listener.close()

    async def __aenter__(self) -> QmpMonitor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- events -------------------------------------------------------------------

    def emit(self, event: str, data: Mapping[str, object] | None = None) -> None:
        """Send event ``event`` with ``data`` to every negotiated client.

        Synchronous and never blocks: call it from any code running on the
        monitor's event loop thread.  A client whose queue is full misses the
        event (see the module docstring).

        :raise QmpError: called from another thread, ``event`` is empty, or
            ``data`` is not JSON-able.
        """
        if self._loop is not None:
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is not self._loop:
                raise QmpError(
                    f"emit({event!r}) called outside the monitor's event loop thread; "
                    "expected a call from code running on that loop"
                )
        if not event:
            raise QmpError("event name is empty; expected a name such as 'VSMMU_EVENT'")
        now = time.time()
        seconds = int(now)
        message: dict[str, object] = {
            "event": event,
            "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1e6)},
        }
        if data is not None:
            message["data"] = dict(data)
        try:
            encoded = self._encode(message)
        except (TypeError, ValueError) as exc:
            raise QmpError(f"event {event!r} data is not JSON-able: {exc}") from exc
        LOG.debug("event %s", encoded[: -len(_LINE_END)].decode())
        for session in self._sessions:
            if session.negotiated:
                self._offer_event(session, event, encoded)

    def _offer_event(self, session: _Session, event: str, encoded: bytes) -> None:
        if session.channel.offer(encoded):
            if session.dropped_events:
                LOG.warning(
                    "%s: delivery resumed after %d dropped events",
                    session.channel.name,
                    session.dropped_events,
                )
                session.dropped_events = 0
            return
        if not session.channel.is_open:
            return
        if session.dropped_events == 0:
            LOG.warning(
                "%s: outbound queue full; dropping events (first: %s) until it drains",
                session.channel.name,
                event,
            )
        session.dropped_events += 1

    # -- protocol -------------------------------------------------------------------

    @staticmethod
    def _encode(message: Mapping[str, object]) -> bytes:
        # ensure_ascii: the spec says the server's output is ASCII.
        return (json.dumps(message, ensure_ascii=True, allow_nan=False) + _LINE_END).encode()

    async def _serve(self, channel: QmpChannel) -> None:
        session = _Session(channel)
        self._sessions.add(session)
        try:
            greeting = {"QMP": {"version": self._version, "capabilities": []}}
            await channel.send(self._encode(greeting))
            while True:
                try:
                    message = await channel.read_message()
                except QmpFramingError as exc:
                    LOG.warning("%s: %s; disconnecting", channel.name, exc)
                    await channel.send(self._error_reply(ErrorClass.GENERIC_ERROR, str(exc)))
                    return
                if message is None:
                    return
                await channel.send(await self._handle_message(session, message))
        finally:
            self._sessions.discard(session)
            if session.dropped_events:
                LOG.warning("%s: left with %d events dropped", channel.name, session.dropped_events)

    async def _handle_message(self, session: _Session, raw: bytes) -> bytes:
        """Parse one framed message and return the encoded reply."""
        try:
            request = self._decoder.decode(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            desc = f"JSON parse error, invalid UTF-8 at byte {exc.start}"
            return self._error_reply(ErrorClass.GENERIC_ERROR, desc)
        except (ValueError, RecursionError) as exc:
            LOG.info("%s: unparsable input: %s", session.channel.name, exc)
            return self._error_reply(ErrorClass.GENERIC_ERROR, _parse_error_desc(exc))
        return await self._dispatch(session, request)

    def _error_reply(
        self, error_class: ErrorClass, desc: str, request_id: object = None, has_id: bool = False
    ) -> bytes:
        reply: dict[str, object] = {"error": {"class": str(error_class), "desc": desc}}
        if has_id:
            reply["id"] = request_id
        return self._encode(reply)

    async def _dispatch(self, session: _Session, request: object) -> bytes:
        """Run one request and return its encoded reply (never raises but cancellation)."""
        has_id = isinstance(request, dict) and "id" in request
        request_id = request.get("id") if isinstance(request, dict) else None
        try:
            name, arguments = self._check_request(request)
            result = await self._run(session, name, arguments)
            reply: dict[str, object] = {"return": {} if result is None else result}
            if has_id:
                reply["id"] = request_id
            try:
                return self._encode(reply)
            except (TypeError, ValueError) as exc:
                LOG.error("command %r returned a value that is not JSON-able: %s", name, exc)
                raise _RequestError(
                    ErrorClass.GENERIC_ERROR,
                    f"Command '{name}' failed: internal error (result is not JSON-able)",
                ) from exc
        except _RequestError as exc:
            return self._error_reply(exc.error_class, exc.desc, request_id, has_id)

    @staticmethod
    def _check_request(request: object) -> tuple[str, dict[str, Any]]:
        """Validate the request envelope as QEMU's qmp_dispatch_check_obj does."""
        if not isinstance(request, dict):
            raise _RequestError(ErrorClass.GENERIC_ERROR, "QMP input must be a JSON object")
        name: str | None = None
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    raise _RequestError(
                        ErrorClass.GENERIC_ERROR, "QMP input member 'execute' must be a string"
                    )
                name = value
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise _RequestError(
                        ErrorClass.GENERIC_ERROR,
                        "QMP input member 'arguments' must be an object",
                    )
            elif key != "id":
                # exec-oob lands here too: oob is never offered.
                raise _RequestError(
                    ErrorClass.GENERIC_ERROR, f"QMP input member '{key}' is unexpected"
                )
        if name is None:
            raise _RequestError(ErrorClass.GENERIC_ERROR, "QMP input lacks member 'execute'")
        return name, request.get("arguments", {})

    async def _run(self, session: _Session, name: str, arguments: dict[str, Any]) -> object:
        channel_name = session.channel.name
        LOG.debug("%s: execute %s %s", channel_name, name, arguments)
        if not session.negotiated:
            if name != CAPABILITIES_COMMAND:
                # QEMU replaces the not-found text with this hint in this mode.
                raise _RequestError(
                    ErrorClass.COMMAND_NOT_FOUND,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                )
            self._negotiate(arguments)
            session.negotiated = True
            LOG.info("%s: capabilities negotiated", channel_name)
            return {}
        if name == CAPABILITIES_COMMAND:
            raise _RequestError(
                ErrorClass.COMMAND_NOT_FOUND,
                "Capabilities negotiation is already complete, command ignored",
            )
        command = self._commands.get(name)
        if command is None:
            raise _RequestError(
                ErrorClass.COMMAND_NOT_FOUND, f"The command {name} has not been found"
            )
        try:
            args = validate_arguments(command.args, arguments)
            result = command.handler(args)
            if inspect.isawaitable(result):
                result = await result
        except QmpCommandError as exc:
            LOG.info("%s: %s failed: %s", channel_name, name, exc.desc)
            raise _RequestError(exc.error_class, exc.desc) from exc
        except Exception as exc:
            LOG.exception("%s: command %s raised", channel_name, name)
            raise _RequestError(
                ErrorClass.GENERIC_ERROR,
                f"Command '{name}' failed: internal error ({type(exc).__name__}: {exc})",
            ) from exc
        return result

    @staticmethod
    def _negotiate(arguments: Mapping[str, Any]) -> None:
        try:
            validate_arguments((Arg("enable", list, optional=True),), arguments)
        except QmpCommandError as exc:
            raise _RequestError(exc.error_class, exc.desc) from exc
        for capability in arguments.get("enable", []):
            # We offer no capability, so any request is for one not offered.
            raise _RequestError(ErrorClass.GENERIC_ERROR, f"Capability {capability} not available")

    # -- built-in commands ------------------------------------------------------------

    def _query_version(self, _args: Arguments) -> object:
        return self._version

    def _query_commands(self, _args: Arguments) -> object:
        names = [CAPABILITIES_COMMAND, *self._commands]
        return [{"name": name} for name in names]
