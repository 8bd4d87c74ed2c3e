"""Kernel module lookup and dependency closure from the modules' own ELF ``.modinfo``.

Debian ships modules as ``.ko.xz``.  Each module's ``.modinfo`` section holds
NUL-separated ``key=value`` strings; ``name=`` is the module name and
``depends=`` the comma-separated names it needs.  We read them with
pyelftools after decompressing with :mod:`lzma`, so no ``depmod`` output or
``kmod`` is needed.
"""

from __future__ import annotations

import io
import logging
import lzma
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

log = logging.getLogger(__name__)

MODULE_SUFFIXES = (".ko.xz", ".ko")


class ModuleError(LookupError):
    """A module is unknown, unreadable or its dependencies cannot be satisfied."""


def module_key(name: str) -> str:
    """Normalise a module name: the kernel treats '-' and '_' alike."""
    return name.replace("-", "_")


@dataclass(frozen=True)
class KernelModule:
    """One loadable module file and what its ``.modinfo`` says."""

    name: str
    path: Path
    depends: tuple[str, ...]

    def object_bytes(self) -> bytes:
        """The uncompressed ELF object, ready for ``insmod``."""
        raw = self.path.read_bytes()
        return lzma.decompress(raw) if self.path.name.endswith(".xz") else raw


def read_modinfo(path: Path) -> dict[str, list[str]]:
    """Return the ``.modinfo`` keys of a module file (values in order of appearance).

    Raises ModuleError if the file is not an ELF object with a ``.modinfo`` section.
    """
    raw = path.read_bytes()
    try:
        if path.name.endswith(".xz"):
            raw = lzma.decompress(raw)
        elf = ELFFile(io.BytesIO(raw))
        section = elf.get_section_by_name(".modinfo")
    except Exception as exc:  # lzma and pyelftools raise many kinds
        raise ModuleError(f"module file {path} is not a readable ELF object: {exc}") from exc
    if section is None:
        raise ModuleError(f"module file {path} has no .modinfo section, expected one")
    info: dict[str, list[str]] = {}
    for item in bytes(section.data()).split(b"\0"):
        if b"=" in item:
            key, _, value = item.decode(errors="replace").partition("=")
            info.setdefault(key, []).append(value)
    return info


class ModuleTree:
    """The modules of one kernel release: ``<root>/usr/lib/modules/<release>``."""

    def __init__(self, modules_dir: Path) -> None:
        self.modules_dir = modules_dir
        self._parsed: dict[str, KernelModule] = {}
        self._files: dict[str, Path] = {}
        for path in sorted(modules_dir.rglob("*.ko*")):
            for suffix in MODULE_SUFFIXES:
                if path.name.endswith(suffix):
                    self._files[module_key(path.name[: -len(suffix)])] = path
        builtin = modules_dir / "modules.builtin"
        self.builtin: frozenset[str] = frozenset(
            module_key(Path(line.strip()).name.removesuffix(".ko"))
            for line in (builtin.read_text().splitlines() if builtin.exists() else [])
            if line.strip()
        )

    def is_builtin(self, name: str) -> bool:
        """True when ``name`` is compiled into the kernel (nothing to load)."""
        return module_key(name) in self.builtin

    def module(self, name: str) -> KernelModule:
        """Return the module called ``name``; raises ModuleError if there is none."""
        key = module_key(name)
        if key in self._parsed:
            return self._parsed[key]
        path = self._files.get(key)
        if path is None:
            raise ModuleError(f"kernel module {name!r} not found under {self.modules_dir}")
        info = read_modinfo(path)
        depends = tuple(
            module_key(d) for value in info.get("depends", []) for d in value.split(",") if d
        )
        real_name = info.get("name", [key])[0]
        module = KernelModule(module_key(real_name), path, depends)
        self._parsed[key] = module
        return module

    def closure(self, names: list[str]) -> list[KernelModule]:
        """Return ``names`` and everything they depend on, dependencies first.

        Built-in modules are skipped.  Raises ModuleError on an unknown module
        or a dependency cycle.
        """
        ordered: list[KernelModule] = []
        done: set[str] = set()
        visiting: set[str] = set()

        def visit(name: str) -> None:
            key = module_key(name)
            if key in done or self.is_builtin(key):
                return
            if key in visiting:
                raise ModuleError(f"kernel module dependency cycle through {key!r}")
            visiting.add(key)
            module = self.module(name)
            for dep in module.depends:
                visit(dep)
            visiting.discard(key)
            done.add(key)
            ordered.append(module)

        for name in names:
            visit(name)
        return ordered
