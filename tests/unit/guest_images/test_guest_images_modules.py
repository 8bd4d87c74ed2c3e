"""Module closure on the real Debian arm64 modules, read from their .modinfo."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_images.initramfs import READY_MARKER, InitFragment, build_initramfs, compose_init
from guest_images.kernel import GuestKernel
from guest_images.modules import ModuleError, ModuleTree, read_modinfo
from guest_images.newc import read_newc
from qmp_harness.fixtures import GuestEnvironment


@pytest.fixture(scope="module")
def guest(guest_env: GuestEnvironment) -> GuestKernel:
    return guest_env.guest


@pytest.fixture(scope="module")
def tree(guest: GuestKernel) -> ModuleTree:
    return guest.module_tree()


def test_vfio_pci_closure_lists_dependencies_first(tree: ModuleTree) -> None:
    closure = [m.name for m in tree.closure(["vfio-pci"])]
    assert closure[-1] == "vfio_pci"
    assert "vfio_pci_core" in closure and "vfio" in closure
    assert closure.index("vfio") < closure.index("vfio_pci_core") < closure.index("vfio_pci")
    # every module's own depends= is satisfied by something earlier in the list
    for i, name in enumerate(closure):
        for dep in tree.module(name).depends:
            assert tree.is_builtin(dep) or dep in closure[:i]


def test_virtio_rng_closure_matches_modinfo(tree: ModuleTree) -> None:
    module = tree.module("virtio-rng")
    info = read_modinfo(module.path)
    assert info["name"] == ["virtio_rng"]
    declared = [d for d in info.get("depends", [""])[0].split(",") if d]
    closure = [m.name for m in tree.closure(["virtio_rng"])]
    assert closure[-1] == "virtio_rng"
    assert set(closure[:-1]) >= {d for d in declared if not tree.is_builtin(d)}


def test_unknown_module_is_an_error(tree: ModuleTree) -> None:
    with pytest.raises(ModuleError, match="no-such-module"):
        tree.closure(["no-such-module"])


def test_initramfs_holds_decompressed_modules_and_init(guest: GuestKernel, tmp_path: Path) -> None:
    fragment = InitFragment("hello", "echo scenario-step")
    path = build_initramfs(guest, tmp_path, modules=["vfio-pci"], fragments=[fragment])
    entries = {e.name: e for e in read_newc(path.read_bytes())}
    ko = entries["lib/modules/vfio_pci.ko"].data
    assert ko.startswith(b"\x7fELF")
    init = entries["init"].data.decode()
    assert init.index("insmod /lib/modules/vfio.ko") < init.index("vfio_pci.ko")
    assert init.index("echo scenario-step") < init.index(READY_MARKER)
    assert entries["bin/busybox"].data == guest.busybox.read_bytes()


def test_compose_init_keeps_fragment_order() -> None:
    init = compose_init([], [InitFragment("a", "echo one"), InitFragment("b", "echo two")])
    assert init.index("echo one") < init.index("echo two") < init.index(READY_MARKER)
