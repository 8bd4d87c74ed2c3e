"""QEMU played by the project's own vfio-user client, the guest by ``GuestDriver``.

:class:`ClientVmm` starts ``vsmmu serve`` (any backend, one endpoint) as a
subprocess and does what QEMU does with it, with no QEMU and no guest OS:
it connects to the SMMU function and to the endpoint function, negotiates,
and DMA-maps the guest RAM — a memfd, passed with its fd — into both.  The
guest is :class:`vsmmu.smmu.guest_driver.GuestDriver` (Linux's arm-smmu-v3
register sequences), whose register accesses become REGION_READ/WRITE of the
SMMU function's BAR 0 (:class:`SmmuMmio`); its stream table, queues, CDs and
page tables live in that memfd (:class:`GuestMemfd`).

One scenario thus runs on either backend: the sim with the emulated
``iommu-testdev`` (``--endpoint iommu-testdev``), or the real kernel with a
real ``iommu-testdev`` passed through (``--endpoint vfio=/dev/vfio/devices/
vfioN``, inside the host lane).  :class:`Testdev` drives either through the
endpoint's BAR 0.  The one thing that differs is the address the device
reads back untranslated: a guest-physical address for the emulated device,
the host-physical address of the same memfd page for the real one
(:meth:`GuestMemfd.host_physical`, from ``/proc/self/pagemap``).

Calls are blocking: the vfio-user and QMP clients run on an event loop in a
helper thread, so ``GuestDriver`` (synchronous, like a CPU) can drive them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError

from qmp_harness.events import EventLog
from vsmmu.arch.pagetables import GRANULE_4K
from vsmmu.endpoints.iommu_testdev import DBELL_ARM, Register, Result
from vsmmu.smmu.guest_driver import GuestDriver, GuestLayout
from vsmmu.smmu.interfaces import GuestMemoryError
from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.client import VfioUserClient

log = logging.getLogger(__name__)

T = TypeVar("T")

RAM_BASE = 0x4000_0000
"""Where guest RAM starts (the ``virt`` machine's)."""
RAM_SIZE = 32 << 20
CALL_TIMEOUT = 60.0
"""Seconds a single vfio-user or QMP call may take (TCG inside TCG is slow)."""
SERVICE_START_TIMEOUT = 120.0
POLL_INTERVAL = 0.05
SMMU_SOCKET = "smmu.sock"
QMP_SOCKET = "qmp.sock"
ENDPOINT_NAME = "ep"
"""The endpoint's name (and socket ``ep.sock``), whatever its kind."""
REGISTER_BYTES = 4
PAGEMAP_ENTRY = 8
PAGEMAP_PRESENT = 1 << 63
PAGEMAP_PFN_MASK = (1 << 55) - 1
PAGE_SIZE = GRANULE_4K.page_size


class ClientVmmError(RuntimeError):
    """The service did not start, a call failed, or the host cannot tell a page's address."""


class GuestMemfd:
    """Guest RAM: a memfd of ``size`` bytes at guest-physical ``base``, mapped here."""

    def __init__(self, base: int = RAM_BASE, size: int = RAM_SIZE) -> None:
        self.base = base
        self.size = size
        self.fd = os.memfd_create("vsmmu-guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        self.memory = mmap.mmap(self.fd, size, mmap.MAP_SHARED)

    def _offset(self, gpa: int, size: int) -> int:
        offset = gpa - self.base
        if size < 0 or offset < 0 or offset + size > self.size:
            raise GuestMemoryError(gpa, size, f"outside RAM [{self.base:#x}, "
                                              f"{self.base + self.size:#x})")
        return offset

    def read(self, gpa: int, size: int) -> bytes:
        """``size`` bytes at ``gpa``. Raises GuestMemoryError outside RAM."""
        offset = self._offset(gpa, size)
        return self.memory[offset : offset + size]

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at ``gpa``. Raises GuestMemoryError outside RAM."""
        offset = self._offset(gpa, len(data))
        self.memory[offset : offset + len(data)] = data

    def host_physical(self, gpa: int) -> int:
        """The host-physical address of ``gpa``'s byte (the page is touched first).

        Reads ``/proc/self/pagemap``, which names page frames only to a
        privileged reader. Raises ClientVmmError when it does not.
        """
        offset = self._offset(gpa, 1)
        page = offset - offset % PAGE_SIZE
        self.memory[page] = self.memory[page]  # present in this process's page table
        virtual = ctypes.addressof(ctypes.c_char.from_buffer(self.memory, page))
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(virtual // PAGE_SIZE * PAGEMAP_ENTRY)
            entry = int.from_bytes(pagemap.read(PAGEMAP_ENTRY), "little")
        frame = entry & PAGEMAP_PFN_MASK
        if not entry & PAGEMAP_PRESENT or frame == 0:
            raise ClientVmmError(f"pagemap gives no frame for GPA {gpa:#x} (entry {entry:#x}): "
                                 "not privileged?")
        return frame * PAGE_SIZE + offset % PAGE_SIZE

    def close(self) -> None:
        """Unmap and close the memfd."""
        self.memory.close()
        os.close(self.fd)


class _LoopThread:
    """An asyncio event loop in a daemon thread, for blocking callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="client-vmm",
                                        daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = CALL_TIMEOUT) -> T:
        """Run ``coro`` on the loop and wait for its result (its exception is raised here)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise ClientVmmError(f"no answer within {timeout} s") from None

    def stop(self) -> None:
        """Stop the loop and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CALL_TIMEOUT)
        self.loop.close()


class BlockingFunction:
    """One vfio-user function as QEMU holds it, with blocking calls."""

    def __init__(self, loop: _LoopThread, socket: Path) -> None:
        self._loop = loop
        self.socket = socket
        self.client = VfioUserClient()

    def connect(self, ram: GuestMemfd) -> None:
        """Connect, negotiate, and DMA-map ``ram`` with its fd, as QEMU does first."""
        async def connect() -> None:
            await self.client.connect(str(self.socket))
            await self.client.negotiate()
            await self.client.dma_map(ram.base, ram.size, fd=ram.fd)

        self._loop.run(connect())

    def read(self, region: int, offset: int, size: int) -> bytes:
        """REGION_READ."""
        return self._loop.run(self.client.region_read(region, offset, size))

    def write(self, region: int, offset: int, data: bytes) -> None:
        """REGION_WRITE (answered: the next read is ordered after it either way)."""
        self._loop.run(self.client.region_write(region, offset, data))

    def reset(self) -> None:
        """DEVICE_RESET (QEMU's system reset)."""
        self._loop.run(self.client.reset())

    def enable(self) -> None:
        """Memory decoding and bus mastering on, as the guest's PCI driver would."""
        command = int.from_bytes(self.read(uapi.PciRegion.CONFIG, uapi.PCI_COMMAND, 2), "little")
        command |= uapi.PCI_COMMAND_MEMORY | uapi.PCI_COMMAND_MASTER
        self.write(uapi.PciRegion.CONFIG, uapi.PCI_COMMAND, command.to_bytes(2, "little"))

    def close(self) -> None:
        """Disconnect (as QEMU does when it exits)."""
        self._loop.run(self.client.close())
        self.client = VfioUserClient()


class SmmuMmio:
    """The SMMU's registers as ``GuestDriver`` reads and writes them: BAR 0 over vfio-user."""

    def __init__(self, function: BlockingFunction) -> None:
        self.function = function

    def read(self, offset: int, size: int) -> int:
        """A register read (one REGION_READ)."""
        return int.from_bytes(self.function.read(uapi.PciRegion.BAR0, offset, size), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """A register write (one REGION_WRITE)."""
        self.function.write(uapi.PciRegion.BAR0, offset, value.to_bytes(size, "little"))


class RegionIo(Protocol):
    """Reads and writes of a PCI function's regions by index (vfio-user or a VFIO cdev)."""

    def read(self, region: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of region ``region``."""

    def write(self, region: int, offset: int, data: bytes) -> None:
        """``data`` at ``offset`` of region ``region``."""


class Testdev:
    """``iommu-testdev``'s registers (BAR 0), emulated or real: over vfio-user, or
    through a VFIO cdev of QEMU's own device (the host lane)."""

    def __init__(self, function: RegionIo) -> None:
        self.function = function

    def read(self, register: Register) -> int:
        """One 32-bit register."""
        data = self.function.read(uapi.PciRegion.BAR0, register, REGISTER_BYTES)
        return int.from_bytes(data, "little")

    def write(self, register: Register, value: int) -> None:
        """One 32-bit register."""
        self.function.write(uapi.PciRegion.BAR0, register, value.to_bytes(REGISTER_BYTES,
                                                                          "little"))

    def dma(self, iova: int, length: int, readback: int) -> Result | int:
        """Arm a DMA of ``length`` pattern bytes to ``iova``, trigger it, return RESULT.

        ``readback`` is where the device reads the bytes back untranslated.
        """
        mask = (1 << (8 * REGISTER_BYTES)) - 1
        shift = 8 * REGISTER_BYTES
        self.write(Register.GVA_LO, iova & mask)
        self.write(Register.GVA_HI, iova >> shift)
        self.write(Register.LEN, length)
        self.write(Register.GPA_LO, readback & mask)
        self.write(Register.GPA_HI, readback >> shift)
        self.write(Register.DBELL, DBELL_ARM)
        self.read(Register.TRIGGER)
        result = self.read(Register.RESULT)
        with contextlib.suppress(ValueError):
            return Result(result)
        return result


class ClientVmm:
    """``vsmmu serve`` with one endpoint, QEMU's side played here (module docstring).

    ``endpoint`` is the endpoint's spec without ``sid``/``name`` (e.g.
    ``"iommu-testdev"`` or ``"vfio=/dev/vfio/devices/vfio0"``); ``service_args``
    go to ``vsmmu serve`` as they are.  Use as a context manager.
    """

    def __init__(self, workdir: Path, endpoint: str, *, sid: int, backend: str = "sim",
                 service_args: Sequence[str] = (), layout: GuestLayout | None = None) -> None:
        self.workdir = workdir
        self.endpoint_spec = endpoint
        self.sid = sid
        self.backend = backend
        self.service_args = list(service_args)
        self.service_log = workdir / "service.log"
        self.ram = GuestMemfd()
        self._loop = _LoopThread()
        self.smmu = BlockingFunction(self._loop, workdir / SMMU_SOCKET)
        self.endpoint = BlockingFunction(self._loop, workdir / f"{ENDPOINT_NAME}.sock")
        self.driver = GuestDriver(SmmuMmio(self.smmu), self.ram, layout)
        self.testdev = Testdev(self.endpoint)
        self.qmp = QMPClient("vsmmu-service")
        self.events = EventLog("vsmmu-service")
        self._proc: subprocess.Popen[bytes] | None = None

    def service_argv(self) -> list[str]:
        """The ``vsmmu serve`` command line."""
        spec = f"{self.endpoint_spec},name={ENDPOINT_NAME},sid={self.sid:#x}"
        return [sys.executable, "-m", "vsmmu.cli", "serve", "--socket-dir", str(self.workdir),
                "--backend", self.backend, "--endpoint", spec, "--log-level", "info",
                *self.service_args]

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the service, connect QMP and both functions, map RAM, enable the endpoint.

        Raises ClientVmmError (with the service log's tail) when the service
        does not come up.
        """
        with open(self.service_log, "wb") as out:
            self._proc = subprocess.Popen(self.service_argv(), stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + SERVICE_START_TIMEOUT

        async def connect_qmp() -> None:
            await self.qmp.connect(str(self.workdir / QMP_SOCKET))
            self.events.attach(self.qmp)

        # A socket file exists from bind() on, before listen(): retry until the service
        # accepts (QMP first, then each function, in the order the service starts them).
        self._until_accepted(deadline, lambda: self._loop.run(connect_qmp()), None)
        self._until_accepted(deadline, lambda: self.smmu.connect(self.ram), self.smmu)
        self._until_accepted(deadline, lambda: self.endpoint.connect(self.ram), self.endpoint)
        self.endpoint.enable()

    def _until_accepted(self, deadline: float, connect: Callable[[], None],
                        function: BlockingFunction | None) -> None:
        while True:
            try:
                connect()
                return
            except (ConnectError, ConnectionError, FileNotFoundError):
                assert self._proc is not None
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    raise ClientVmmError(self.report(
                        f"vsmmu serve did not start (status {self._proc.returncode})")) from None
                if function is not None:
                    function.client = VfioUserClient()  # a client connects once
                time.sleep(POLL_INTERVAL)

    def connect(self) -> None:
        """Connect both functions as QEMU does (VERSION, DMA_MAP) and enable the endpoint."""
        self.smmu.connect(self.ram)
        self.endpoint.connect(self.ram)
        self.endpoint.enable()

    def disconnect(self) -> None:
        """Both clients go away, as when QEMU exits."""
        self.endpoint.close()
        self.smmu.close()

    def close(self) -> None:
        """Disconnect, stop the service (SIGTERM, then SIGKILL), release the RAM."""
        with contextlib.suppress(Exception):
            self.disconnect()

        async def close_qmp() -> None:
            await self.events.close()
            await self.qmp.disconnect()

        with contextlib.suppress(Exception):
            self._loop.run(close_qmp())
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(CALL_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._loop.stop()
        self.ram.close()

    def __enter__(self) -> ClientVmm:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def report(self, why: str) -> str:
        """``why`` and the tail of the service's log."""
        try:
            tail = self.service_log.read_text(errors="replace").splitlines()[-40:]
        except OSError:
            tail = []
        return f"{why}\n--- service log tail ---\n" + "\n".join(tail)

    # -- the service's QMP ----------------------------------------------------

    def service(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """One QMP command to the service; its return value."""
        return self._loop.run(self.qmp.execute(command, dict(arguments or {})))

    def wait_event(self, name: str, *, since: int = 0, match: Mapping[str, object] | None = None,
                   timeout: float = CALL_TIMEOUT) -> Mapping[str, Any]:
        """The first service event ``name`` (at index >= ``since``) whose data has ``match``."""
        return self._loop.run(self.events.wait(name, timeout, since=since, match=match),
                              timeout + 1)

    def object_types(self) -> list[str]:
        """The types of every iommufd object the service holds, by id."""
        return [row["type"] for row in self.service("query-vsmmu-iommufd")]
