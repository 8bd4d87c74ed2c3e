"""The service's QMP monitor: a QMP server on a unix socket.

Two layers, as in ``qemu.qmp``: :mod:`vsmmu.qmp.transport` owns the socket,
line framing, per-client queues and disconnects; :mod:`vsmmu.qmp.monitor`
speaks QMP (greeting, capabilities negotiation, dispatch, events) on top.
The monitor is generic: the service registers its own commands and emits its
own events.  Any QMP client works, e.g. ``qemu.qmp.QMPClient`` or ``qmp-shell``.

How the service plugs in (names are the service's, not this package's)::

    from vsmmu.qmp import Arg, QmpCommandError, QmpMonitor

    monitor = QmpMonitor("/run/vsmmu/qmp.sock")

    def query_vsmmu(args: dict[str, Any]) -> dict[str, object]:
        return {"enabled": smmu.enabled, "gerror": smmu.gerror}

    async def inject_transaction(args: dict[str, Any]) -> dict[str, object]:
        if args["sid"] >= smmu.num_sids:
            raise QmpCommandError(f"StreamID {args['sid']:#x} is out of range")
        return await translator.inject(args["sid"], args.get("ssid", 0), args["iova"])

    monitor.register("query-vsmmu", query_vsmmu, doc="Report the vSMMU's state.")
    monitor.register(
        "x-vsmmu-inject-transaction",
        inject_transaction,
        doc="Issue one transaction as if an endpoint had sent it.",
        args=[Arg("sid", int), Arg("ssid", int, optional=True), Arg("iova", int)],
    )
    await monitor.start()
    ...
    # from any code on the event loop thread, sync or async:
    monitor.emit("VSMMU_EVENT", {"type": "C_BAD_STE", "sid": 0x10})
    ...
    await monitor.close()   # disconnects clients, removes the socket file

A client sees ``{"event": "VSMMU_EVENT", "data": {...}, "timestamp":
{"seconds": ..., "microseconds": ...}}``; a handler's ``QmpCommandError``
becomes ``{"error": {"class": "GenericError", "desc": ...}}``.
"""

from vsmmu.qmp.errors import (
    ErrorClass,
    QmpCommandError,
    QmpError,
    QmpFramingError,
    QmpTransportError,
)
from vsmmu.qmp.monitor import Arguments, Command, Handler, QmpMonitor, package_version_info
from vsmmu.qmp.schema import Arg

__all__ = [
    "Arg",
    "Arguments",
    "Command",
    "ErrorClass",
    "Handler",
    "QmpCommandError",
    "QmpError",
    "QmpFramingError",
    "QmpMonitor",
    "QmpTransportError",
    "package_version_info",
]
