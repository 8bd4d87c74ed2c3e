"""pytest fixtures for suites that boot guests; load with ``pytest_plugins``.

* ``vsmmu_cache`` — the cache directory (``$VSMMU_CACHE`` or ``~/.cache/vsmmu``).
* ``guest_env`` — provisioned QEMU + guest kernel (:class:`GuestEnvironment`),
  once per session; the kernel suite comes from ``$VSMMU_GUEST_SUITE``.
* ``boot_machine`` — an async factory: ``vm = await boot_machine(devices=[...],
  modules=[...], fragments=[...], dtb=..., paused=True)``.  Every machine it
  made is shut down when the test ends.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import pytest

from guest_images.cache import default_cache
from guest_images.initramfs import InitFragment, build_initramfs
from guest_images.kernel import DEFAULT_SUITE, GuestKernel, ensure_guest
from qmp_harness.machine import (
    BOOT_TIMEOUT,
    DEFAULT_APPEND,
    BootedMachines,
    Machine,
    MachineConfig,
)
from qmp_harness.provision import QemuInstall, ensure_qemu

SUITE_ENV = "VSMMU_GUEST_SUITE"


@dataclass(frozen=True)
class GuestEnvironment:
    """Everything needed to boot guests: QEMU, the guest kernel, the cache."""

    cache: Path
    qemu: QemuInstall
    guest: GuestKernel

    def guest_for(self, suite: str | None) -> GuestKernel:
        """The guest kernel of ``suite``: this environment's own for None or its suite.

        Another suite is loaded from the cache (provisioned first if missing,
        as ``make guest`` does for trixie-backports).
        """
        if suite is None or suite == self.guest.suite:
            return self.guest
        return ensure_guest(self.cache, suite, quiet=True)

    def initramfs(
        self, *, modules: Sequence[str] = (), fragments: Sequence[InitFragment] = ()
    ) -> Path:
        """Build (or reuse) an initramfs with ``modules`` and ``fragments``."""
        return build_initramfs(
            self.guest, self.cache / "initramfs", modules=modules, fragments=fragments
        )

    def machine_config(
        self,
        *,
        modules: Sequence[str] = (),
        fragments: Sequence[InitFragment] = (),
        devices: Sequence[str] = (),
        dtb: Path | None = None,
        append: str = DEFAULT_APPEND,
        extra_args: Sequence[str] = (),
    ) -> MachineConfig:
        """A :class:`MachineConfig` booting this guest with the given additions."""
        return MachineConfig(
            kernel=self.guest.image,
            initrd=self.initramfs(modules=modules, fragments=fragments),
            append=append,
            dtb=dtb,
            devices=tuple(devices),
            extra_args=tuple(extra_args),
        )


def provision_environment(cache: Path | None = None, suite: str | None = None) -> GuestEnvironment:
    """Provision (or load) QEMU and the guest kernel into ``cache``."""
    cache = cache or default_cache()
    suite = suite or os.environ.get(SUITE_ENV, DEFAULT_SUITE)
    return GuestEnvironment(
        cache=cache,
        qemu=ensure_qemu(cache, quiet=True),
        guest=ensure_guest(cache, suite, quiet=True),
    )


class BootMachine(Protocol):
    """The ``boot_machine`` fixture's call signature."""

    async def __call__(
        self,
        *,
        modules: Sequence[str] = (),
        fragments: Sequence[InitFragment] = (),
        devices: Sequence[str] = (),
        dtb: Path | None = None,
        append: str = DEFAULT_APPEND,
        extra_args: Sequence[str] = (),
        paused: bool = False,
        wait_ready: bool = True,
        timeout: float = BOOT_TIMEOUT,
    ) -> Machine: ...


@pytest.fixture(scope="session")
def vsmmu_cache() -> Path:
    """The cache directory (``$VSMMU_CACHE`` or ``~/.cache/vsmmu``)."""
    return default_cache()


@pytest.fixture(scope="session")
def guest_env(vsmmu_cache: Path) -> GuestEnvironment:
    """QEMU 11.1 and the guest kernel, provisioned once per session."""
    return provision_environment(vsmmu_cache)


@pytest.fixture
async def boot_machine(guest_env: GuestEnvironment) -> AsyncIterator[BootMachine]:
    """Factory booting machines; all are shut down after the test.

    With ``paused=True`` QEMU is started stopped (``-S``): inspect it, then
    call ``await vm.resume()`` and ``await vm.wait_ready()``.
    """
    booted = BootedMachines()

    async def boot(
        *,
        modules: Sequence[str] = (),
        fragments: Sequence[InitFragment] = (),
        devices: Sequence[str] = (),
        dtb: Path | None = None,
        append: str = DEFAULT_APPEND,
        extra_args: Sequence[str] = (),
        paused: bool = False,
        wait_ready: bool = True,
        timeout: float = BOOT_TIMEOUT,
    ) -> Machine:
        config = guest_env.machine_config(
            modules=modules, fragments=fragments, devices=devices, dtb=dtb,
            append=append, extra_args=extra_args,
        )
        machine = Machine(guest_env.qemu, config, name=f"vm{len(booted.machines)}")
        booted.machines.append(machine)
        await machine.start(paused=paused)
        if wait_ready and not paused:
            await machine.wait_ready(timeout)
        return machine

    yield boot
    await booted.shutdown_all()
