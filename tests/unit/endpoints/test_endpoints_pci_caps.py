"""Device-supplied PCI capabilities (the small additive mechanism in vsmmu.vfio_user.pci)."""

from __future__ import annotations

import pytest

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.pci import BarLayout, PciCapability, PciConfigError, PciConfigSpace
from vsmmu.vfio_user.sample import SAMPLE_IDENTITY


def u32(space: PciConfigSpace, offset: int) -> int:
    return int.from_bytes(space.read(offset, 4), "little")


def walk_standard(space: PciConfigSpace) -> list[tuple[int, int]]:
    """(offset, id) of every standard capability, as Linux walks them."""
    found = []
    offset = space.read(uapi.PCI_CAPABILITY_LIST, 1)[0]
    while offset:
        found.append((offset, space.read(offset, 1)[0]))
        offset = space.read(offset + uapi.PCI_CAP_LIST_NEXT, 1)[0] & ~3
    return found


def test_vendor_capabilities_follow_pcie_and_keep_their_bodies() -> None:
    first = PciCapability(uapi.PCI_CAP_ID_VNDR, bytes([0, 0, 16, 1]) + bytes(12))
    second = PciCapability(uapi.PCI_CAP_ID_VNDR, bytes([0, 0, 20, 2]) + bytes(16))
    space = PciConfigSpace(SAMPLE_IDENTITY, {0: BarLayout(0x4000)}, capabilities=[first, second])
    chain = walk_standard(space)
    assert [cap_id for _, cap_id in chain] == [
        uapi.PCI_CAP_ID_EXP,
        uapi.PCI_CAP_ID_VNDR,
        uapi.PCI_CAP_ID_VNDR,
    ]
    assert space.read(chain[1][0] + 3, 1) == b"\x01"
    assert space.read(chain[2][0] + 2, 2) == bytes([20, 2])
    assert all(offset % 4 == 0 for offset, _ in chain)


def test_extended_capability_header_chain_and_write_mask() -> None:
    body = bytes(uapi.PCI_EXT_CAP_ATS_SIZEOF)
    writable = uapi.PCI_ATS_CTRL_ENABLE | uapi.PCI_ATS_CTRL_STU_MASK
    wmask = bytearray(len(body))
    wmask[uapi.PCI_ATS_CTRL : uapi.PCI_ATS_CTRL + 2] = writable.to_bytes(2, "little")
    ats = PciCapability(uapi.PCI_EXT_CAP_ID_ATS, body, wmask=bytes(wmask), version=1)
    other = PciCapability(0x0001, bytes(12), version=2)
    space = PciConfigSpace(SAMPLE_IDENTITY, {}, ext_capabilities=[ats, other])
    header = u32(space, uapi.PCI_EXT_CAP_FIRST)
    assert header & 0xFFFF == uapi.PCI_EXT_CAP_ID_ATS
    assert (header >> uapi.PCI_EXT_CAP_VER_SHIFT) & 0xF == 1
    nxt = header >> uapi.PCI_EXT_CAP_NEXT_SHIFT
    assert nxt == uapi.PCI_EXT_CAP_FIRST + uapi.PCI_EXT_CAP_ATS_SIZEOF
    second = u32(space, nxt)
    assert second & 0xFFFF == 0x0001 and second >> uapi.PCI_EXT_CAP_NEXT_SHIFT == 0
    # Only the masked bits are guest-writable; the header is read-only.
    space.write(uapi.PCI_EXT_CAP_FIRST, b"\xff" * uapi.PCI_EXT_CAP_ATS_SIZEOF)
    assert u32(space, uapi.PCI_EXT_CAP_FIRST) == header
    ctrl = uapi.PCI_EXT_CAP_FIRST + uapi.PCI_ATS_CTRL
    assert space.read_u16(ctrl) == writable
    assert space.read_u16(uapi.PCI_EXT_CAP_FIRST + uapi.PCI_ATS_CAP) == 0
    space.reset()
    assert space.read_u16(ctrl) == 0


def test_no_extended_capabilities_leaves_an_empty_list() -> None:
    space = PciConfigSpace(SAMPLE_IDENTITY, {})
    assert u32(space, uapi.PCI_EXT_CAP_FIRST) == 0


@pytest.mark.parametrize(
    ("capabilities", "ext_capabilities", "message"),
    [
        ([PciCapability(uapi.PCI_CAP_ID_VNDR, bytes(6))], [], "multiple of 4"),
        ([PciCapability(uapi.PCI_CAP_ID_VNDR, bytes(200))], [], "capabilities end"),
        ([PciCapability(uapi.PCI_CAP_ID_VNDR, bytes(4), wmask=bytes(2))], [], "wmask"),
        (
            [],
            [PciCapability(uapi.PCI_EXT_CAP_ID_ATS, bytes(uapi.PCI_CFG_SPACE_EXP_SIZE))],
            "extended capability",
        ),
    ],
)
def test_impossible_capabilities_are_refused(
    capabilities: list[PciCapability], ext_capabilities: list[PciCapability], message: str
) -> None:
    with pytest.raises(PciConfigError, match=message):
        PciConfigSpace(
            SAMPLE_IDENTITY, {}, capabilities=capabilities, ext_capabilities=ext_capabilities
        )
