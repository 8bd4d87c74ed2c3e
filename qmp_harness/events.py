"""Collecting the events of one QMP connection, in order, and waiting for one of them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from qemu.qmp import EventListener, QMPClient

log = logging.getLogger(__name__)


class EventLog:
    """Every event a :class:`~qemu.qmp.QMPClient` receives after :meth:`attach`, in order.

    Used for QEMU's monitor and for the service's, so that tests and failure reports
    see both sides the same way.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[Mapping[str, Any]] = []
        self._listener = EventListener()
        self._seen = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def attach(self, qmp: QMPClient) -> None:
        """Start collecting ``qmp``'s events (call once, after it connected)."""
        qmp.register_listener(self._listener)
        self._task = asyncio.create_task(self._collect(), name=f"{self.name}-events")

    async def _collect(self) -> None:
        async for event in self._listener:
            log.debug("%s event: %s", self.name, event)
            self.events.append(event)
            self._seen.set()

    async def wait(
        self, name: str, timeout: float, *, since: int = 0,
        match: Mapping[str, object] | None = None,
    ) -> Mapping[str, Any]:
        """The first event ``name`` at index >= ``since`` whose data contains ``match``.

        Raises TimeoutError if none arrives within ``timeout`` seconds.
        """
        wanted = dict(match or {})
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[since:]:
                    data = event.get("data", {})
                    if event["event"] == name and all(data.get(k) == v
                                                      for k, v in wanted.items()):
                        return event
                self._seen.clear()
                await self._seen.wait()

    async def close(self) -> None:
        """Stop collecting (idempotent); the events gathered so far stay readable."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
