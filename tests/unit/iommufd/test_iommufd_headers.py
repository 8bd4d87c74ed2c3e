"""Header cross-check: our uAPI against the kernel headers of a recent Debian linux-libc-dev."""

from __future__ import annotations

import ctypes
import enum
import subprocess
from pathlib import Path

from guest_images.cache import default_cache
from guest_images.debian import DebianArchive
from vsmmu.iommufd import uapi, uapi_vfio

UAPI_MODULES = (uapi, uapi_vfio)
"""Each declares ALL_STRUCTS, ALL_ENUMS, C_FIELD_NAMES and c_name(); both are checked."""


def expected_lines() -> list[str]:
    """Our view: one ``kind name value`` line per size, offset, enum value and ioctl."""
    lines: list[str] = []
    for module in UAPI_MODULES:
        for struct in module.ALL_STRUCTS:
            lines.append(f"sizeof {struct.C_NAME} {ctypes.sizeof(struct)}")
            for fname, *_ in struct._fields_:
                cname = module.C_FIELD_NAMES.get(fname, fname)
                offset = getattr(struct, fname).offset
                lines.append(f"offsetof {struct.C_NAME}.{cname} {offset}")
        for enum_type in module.ALL_ENUMS:
            for member in enum_type.__members__.values():
                assert isinstance(member, enum.IntEnum | enum.IntFlag)
                lines.append(f"value {module.c_name(member)} {int(member)}")
    return lines


def c_source() -> str:
    """The C program printing the same lines from the headers."""
    body: list[str] = []
    for line in expected_lines():
        kind, name, _ = line.split(" ")
        if kind == "sizeof":
            expr = f"sizeof(struct {name})"
        elif kind == "offsetof":
            sname, field = name.split(".")
            expr = f"offsetof(struct {sname}, {field})"
        else:
            expr = f"(unsigned long long)({name})"
        body.append(f'    printf("{kind} {name} %llu\\n", (unsigned long long)({expr}));')
    return (
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/iommufd.h>\n"
        "#include <linux/vfio.h>\n\nint main(void)\n{\n" + "\n".join(body) + "\n    return 0;\n}\n"
    )


CACHE = default_cache()


def linux_libc_dev_include() -> Path:
    """Fetch (once) sid's amd64 linux-libc-dev into the cache; return its include dir."""
    root = DebianArchive(CACHE).fetch_unpacked(["linux-libc-dev"], arch="amd64", suite="sid")
    include = root / "usr" / "include"
    assert (include / "linux" / "iommufd.h").is_file(), f"no linux/iommufd.h under {include}"
    return include


def test_c_program_covers_every_struct_field_and_enum() -> None:
    """The generated program mentions every declared structure and constant."""
    src = c_source()
    for struct in (*uapi.ALL_STRUCTS, *uapi_vfio.ALL_STRUCTS):
        assert f"struct {struct.C_NAME}" in src
    assert "IOMMU_VIOMMU_INVALIDATE_DATA_ARM_SMMUV3" in src
    assert "VFIO_DEVICE_DETACH_IOMMUFD_PT" in src
    assert "VFIO_DEVICE_SET_IRQS" in src and "VFIO_PCI_CONFIG_REGION_INDEX" in src


def test_headers_match_kernel(tmp_path: Path) -> None:
    """Compile against the fetched headers and compare every line: 0 mismatches."""
    include = linux_libc_dev_include()
    src = tmp_path / "uapi_check.c"
    src.write_text(c_source())
    exe = tmp_path / "uapi_check"
    subprocess.run(
        [
            "gcc",
            "-std=gnu11",
            "-I",
            str(include),
            "-I",
            str(include / "x86_64-linux-gnu"),
            "-o",
            str(exe),
            str(src),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    got = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    want = expected_lines()
    mismatches = [(w, g) for w, g in zip(want, got, strict=True) if w != g]
    assert mismatches == [], f"{len(mismatches)} mismatches against {include}: {mismatches}"
    assert len(want) > 150
