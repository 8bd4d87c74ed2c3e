"""The guest initramfs: busybox, chosen kernel modules and an ``/init`` made of fragments.

``/init`` is a busybox shell script composed of:

1. a fixed prologue (mount proc/sys/devtmpfs, install busybox applets),
2. ``insmod`` of the requested modules and their dependency closure,
3. the caller's :class:`InitFragment` s in order (scenario steps),
4. a fixed epilogue that prints :data:`READY_MARKER` and runs a shell on the
   console for the harness (see ``qmp_harness.console``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from guest_images.kernel import GuestKernel
from guest_images.newc import NewcEntry, write_newc

READY_MARKER = "VSMMU-GUEST-READY"
"""Printed on the console once every fragment has run and the shell is up."""

CONSOLE_MAJOR, CONSOLE_MINOR = 5, 1
NULL_MAJOR, NULL_MINOR = 1, 3
EXECUTABLE = 0o755

PROLOGUE = """\
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
export PATH=/bin
echo "vsmmu guest: init started, kernel $(uname -r)"
"""

EPILOGUE = f"""\
echo "{READY_MARKER}"
stty -echo 2>/dev/null
while true; do setsid cttyhack sh; done
"""


@dataclass(frozen=True)
class InitFragment:
    """A named piece of shell run by ``/init`` (e.g. enabling a PCI function)."""

    name: str
    script: str

    def render(self) -> str:
        """The fragment as it appears in ``/init``, with a heading comment."""
        body = self.script if self.script.endswith("\n") else self.script + "\n"
        return f"# --- fragment: {self.name}\n{body}"


def compose_init(module_names: Sequence[str], fragments: Sequence[InitFragment]) -> str:
    """Return the text of ``/init`` that loads ``module_names`` (in order) and runs fragments."""
    loads = "".join(
        f'insmod /lib/modules/{name}.ko || echo "vsmmu guest: insmod {name} failed"\n'
        for name in module_names
    )
    return PROLOGUE + loads + "".join(f.render() for f in fragments) + EPILOGUE


def build_initramfs(
    guest: GuestKernel,
    dest_dir: Path,
    *,
    modules: Sequence[str] = (),
    fragments: Sequence[InitFragment] = (),
) -> Path:
    """Write an initramfs for ``guest`` into ``dest_dir`` and return its path.

    ``modules`` are module names; their dependency closure is added and
    loaded first.  The file name is derived from the content, so identical
    requests share one file.
    """
    closure = guest.module_tree().closure(list(modules))
    init = compose_init([m.name for m in closure], fragments)
    entries = [
        NewcEntry.directory("bin"),
        NewcEntry.directory("dev"),
        NewcEntry.char_device("dev/console", CONSOLE_MAJOR, CONSOLE_MINOR),
        NewcEntry.char_device("dev/null", NULL_MAJOR, NULL_MINOR, 0o666),
        NewcEntry.directory("proc"),
        NewcEntry.directory("sys"),
        NewcEntry.directory("tmp", 0o1777),
        NewcEntry.directory("lib"),
        NewcEntry.directory("lib/modules"),
        NewcEntry.file("bin/busybox", guest.busybox.read_bytes(), EXECUTABLE),
        NewcEntry.symlink("bin/sh", "busybox"),
        *(NewcEntry.file(f"lib/modules/{m.name}.ko", m.object_bytes()) for m in closure),
        NewcEntry.file("init", init.encode(), EXECUTABLE),
    ]
    archive = write_newc(entries)
    digest = hashlib.sha256(archive).hexdigest()[:16]
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / f"initramfs-{digest}.cpio"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(archive)
        tmp.replace(path)
    return path
