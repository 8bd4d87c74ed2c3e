"""Launch ``qemu-system-aarch64 -M virt`` and drive it over QMP and its serial console.

Typical use (inside a coroutine)::

    config = MachineConfig(kernel=guest.image, initrd=initramfs,
                           devices=['{"driver":"edu","addr":"0x1"}'])
    async with Machine(install, config) as vm:
        await vm.start(paused=True)        # QEMU is up, the guest has not run
        pci = await vm.execute("query-pci")
        await vm.resume()
        await vm.wait_ready()
        out, status = await vm.console.run("uname -r")

Every failure while starting or booting raises :class:`BootError` whose
message ends with the last 50 console lines and QEMU's stderr.
:meth:`Machine.shutdown` (also run on leaving the ``async with``) sends QMP
``quit``, kills QEMU after a timeout and removes the sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient, QMPError

from guest_images.initramfs import READY_MARKER
from qmp_harness.console import Console, ConsoleError
from qmp_harness.events import EventLog
from qmp_harness.provision import QemuInstall

log = logging.getLogger(__name__)

DEFAULT_APPEND = "console=ttyAMA0 panic=-1 loglevel=4"
DEFAULT_MEMORY_MIB = 512
DEFAULT_CPUS = 2
CONNECT_TIMEOUT = 20.0
BOOT_TIMEOUT = 120.0
QUIT_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0
TAIL_LINES = 50
POLL_INTERVAL = 0.05


class BootError(RuntimeError):
    """QEMU failed to start, or the guest failed to reach its init."""


@dataclass(frozen=True)
class MachineConfig:
    """What to boot: the kernel, initramfs and the virt machine's options."""

    kernel: Path
    initrd: Path
    append: str = DEFAULT_APPEND
    memory_mib: int = DEFAULT_MEMORY_MIB
    cpus: int = DEFAULT_CPUS
    dtb: Path | None = None
    devices: Sequence[str] = ()
    """``-device`` arguments; JSON strings (required for vfio-user-pci) or dotted form."""
    machine_options: Sequence[str] = ()
    """Extra ``-machine`` options, e.g. ``dumpdtb=FILE``."""
    extra_args: Sequence[str] = ()
    """Anything else appended to the QEMU command line."""


def machine_argv(
    install: QemuInstall,
    config: MachineConfig,
    *,
    qmp_socket: Path | None,
    console_socket: Path | None,
    paused: bool,
) -> list[str]:
    """Build the full QEMU command line for ``config``.

    RAM is a shared memfd so a vfio-user server gets guest memory as fds.
    Without sockets (e.g. for ``dumpdtb``) no monitor or serial is set up.
    """
    machine = ",".join(["virt", "memory-backend=mem", *config.machine_options])
    argv = [
        *install.argv(),
        "-machine", machine,
        "-cpu", "max",
        "-smp", str(config.cpus),
        "-m", f"{config.memory_mib}M",
        "-object", f"memory-backend-memfd,id=mem,size={config.memory_mib}M,share=on",
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-kernel", str(config.kernel),
        "-initrd", str(config.initrd),
        "-append", config.append,
    ]
    if console_socket is not None:
        argv += [
            "-chardev", f"socket,id=console,path={console_socket},server=on,wait=off",
            "-serial", "chardev:console",
        ]
    if qmp_socket is not None:
        argv += [
            "-chardev", f"socket,id=qmp,path={qmp_socket},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]
    if config.dtb is not None:
        argv += ["-dtb", str(config.dtb)]
    for device in config.devices:
        argv += ["-device", device]
    argv += list(config.extra_args)
    if paused:
        argv.append("-S")
    return argv


@dataclass
class _Process:
    proc: asyncio.subprocess.Process
    stderr_path: Path


class Machine:
    """One QEMU virt machine with its QMP session and serial console."""

    def __init__(self, install: QemuInstall, config: MachineConfig, *, name: str = "vm") -> None:
        self.install = install
        self.config = config
        self.name = name
        # Unix socket paths are limited to 108 bytes: keep them short, in /tmp.
        self.workdir = Path(tempfile.mkdtemp(prefix=f"vsmmu-{name}-"))
        self.qmp_socket = self.workdir / "qmp.sock"
        self.console_socket = self.workdir / "console.sock"
        self.qmp = QMPClient(name)
        self.event_log = EventLog(self.name)
        self._console: Console | None = None
        self._process: _Process | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def console(self) -> Console:
        """The serial console (after :meth:`start`)."""
        if self._console is None:
            raise BootError(f"machine {self.name}: console used before start()")
        return self._console

    @property
    def events(self) -> list[Mapping[str, Any]]:
        """Every QMP event QEMU sent since :meth:`start`, in order."""
        return self.event_log.events

    @property
    def pid(self) -> int | None:
        """QEMU's process id while it runs."""
        return self._process.proc.pid if self._process else None

    def argv(self) -> list[str]:
        """The command line :meth:`start` runs."""
        return machine_argv(
            self.install, self.config,
            qmp_socket=self.qmp_socket, console_socket=self.console_socket, paused=True,
        )

    async def start(self, *, paused: bool = False, timeout: float = CONNECT_TIMEOUT) -> None:
        """Start QEMU (always with ``-S``), connect QMP and the console, then ``cont``.

        With ``paused`` the guest is left stopped so the caller can inspect
        the machine (e.g. ``query-pci``) before calling :meth:`resume`.
        Raises BootError if QEMU exits or its sockets do not appear in time.
        """
        argv = self.argv()
        log.info("starting %s: %s", self.name, " ".join(argv))
        stderr_path = self.workdir / "qemu.stderr"
        with open(stderr_path, "wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stderr,
                stderr=stderr,
                env=self.install.env(),
            )
        self._process = _Process(proc, stderr_path)
        try:
            async with asyncio.timeout(timeout):
                await self._connect_qmp()
                self._console = await self._retry(lambda: Console.connect(self.console_socket))
        except (TimeoutError, OSError, QMPError) as exc:
            await self.shutdown()
            raise BootError(self.failure_report(f"QEMU did not come up: {exc!r}")) from exc
        self.event_log.attach(self.qmp)
        if not paused:
            await self.resume()

    async def _retry(self, connect: Any) -> Any:
        while True:
            if self._process is not None and self._process.proc.returncode is not None:
                raise BootError(
                    self.failure_report(
                        f"QEMU exited with status {self._process.proc.returncode} during start"
                    )
                )
            try:
                return await connect()
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(POLL_INTERVAL)

    async def _connect_qmp(self) -> None:
        async def connect() -> None:
            if not self.qmp_socket.exists():
                raise FileNotFoundError(self.qmp_socket)
            await self.qmp.connect(str(self.qmp_socket))

        await self._retry(connect)

    async def resume(self) -> None:
        """Let the guest run (QMP ``cont``)."""
        await self.execute("cont")

    async def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for the initramfs to print its ready marker.

        Raises BootError with the console tail and QEMU's stderr on failure.
        """
        try:
            await self.console.wait_for(READY_MARKER, timeout)
        except ConsoleError as exc:
            raise BootError(self.failure_report(str(exc))) from exc

    async def boot(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Start QEMU and wait until the guest is ready for commands."""
        await self.start()
        await self.wait_ready(timeout)

    # -- QMP ---------------------------------------------------------------

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run a QMP command and return its result (raises qemu.qmp.ExecuteError)."""
        return await self.qmp.execute(command, arguments)

    async def query_pci(self) -> list[dict[str, Any]]:
        """The devices on the root PCI bus, as ``query-pci`` reports them."""
        buses = await self.execute("query-pci")
        return [dev for bus in buses for dev in bus["devices"]]

    async def wait_event(self, name: str, timeout: float, *, since: int = 0) -> Mapping[str, Any]:
        """Return the first event called ``name`` at index >= ``since`` in :attr:`events`.

        Raises TimeoutError if none arrives within ``timeout`` seconds.
        """
        return await self.event_log.wait(name, timeout, since=since)

    # -- shutdown and reports ---------------------------------------------

    def stderr_text(self) -> str:
        """What QEMU printed on stdout/stderr so far."""
        if self._process is None or not self._process.stderr_path.exists():
            return ""
        return self._process.stderr_path.read_text(errors="replace")

    def failure_report(self, reason: str) -> str:
        """``reason`` followed by the last console lines and QEMU's stderr."""
        console = self._console.tail(TAIL_LINES) if self._console else "(no console)"
        return (
            f"machine {self.name}: {reason}\n"
            f"--- last {TAIL_LINES} console lines ---\n{console}\n"
            f"--- QEMU stderr ---\n{self.stderr_text()}"
        )

    async def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself and return its status (TimeoutError otherwise)."""
        if self._process is None:
            raise BootError(f"machine {self.name}: wait_exit() before start()")
        async with asyncio.timeout(timeout):
            return await self._process.proc.wait()

    async def shutdown(self, timeout: float = QUIT_TIMEOUT) -> int | None:
        """Quit QEMU (QMP ``quit``), kill it after ``timeout``, remove sockets.

        Returns QEMU's exit status (None if it was never started).  Safe to
        call more than once.
        """
        status: int | None = None
        if self._process is not None:
            proc = self._process.proc
            if proc.returncode is None and self.qmp.runstate.name == "RUNNING":
                with contextlib.suppress(QMPError, OSError, EOFError):
                    await self.qmp.execute("quit")
            try:
                async with asyncio.timeout(timeout):
                    await proc.wait()
            except TimeoutError:
                log.warning("%s: QEMU did not quit in %ss, killing", self.name, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL)
                async with asyncio.timeout(KILL_TIMEOUT):
                    await proc.wait()
            status = proc.returncode
        # QEMU closing the socket first surfaces here as EOFError: expected on quit.
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.qmp.disconnect()
        await self.event_log.close()
        if self._console is not None:
            await self._console.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return status

    async def __aenter__(self) -> Machine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


@dataclass
class BootedMachines:
    """Machines started through a fixture factory, shut down together."""

    machines: list[Machine] = field(default_factory=list)

    async def shutdown_all(self) -> None:
        """Shut every machine down (errors are logged, not raised)."""
        for machine in reversed(self.machines):
            try:
                await machine.shutdown()
            except Exception:  # one machine's failure must not leak the others
                log.exception("shutdown of %s failed", machine.name)
