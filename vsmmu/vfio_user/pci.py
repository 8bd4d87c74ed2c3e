"""PCI configuration space of a vfio-user function: type-0 header, BARs, capabilities.

The space is a byte array with a write mask and a write-1-to-clear mask per
byte, built once from the device description; writes only change writable
bits, which gives BAR sizing for free (a BAR's address bits below its size
are read-only zeros, so writing all ones reads back the size mask).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from vsmmu.vfio_user import uapi
from vsmmu.vfio_user.messages import VfioUserError

logger = logging.getLogger(__name__)

_DWORD_MASK = 0xFFFF_FFFF
_DWORD_BITS = 32


class PciConfigError(VfioUserError):
    """A device description that cannot be a valid PCI function."""


@dataclasses.dataclass(frozen=True)
class BarLayout:
    """How one memory BAR presents itself in config space."""

    size: int
    is_64bit: bool = False
    prefetchable: bool = False

    def flag_bits(self) -> int:
        """The read-only low bits of the BAR register."""
        bits = 0
        if self.is_64bit:
            bits |= uapi.PCI_BASE_ADDRESS_MEM_TYPE_64
        if self.prefetchable:
            bits |= uapi.PCI_BASE_ADDRESS_MEM_PREFETCH
        return bits


@dataclasses.dataclass(frozen=True)
class MsixLayout:
    """Where the MSI-X table and PBA live (the BAR's handlers must serve them)."""

    vectors: int
    bar: int
    table_offset: int
    pba_offset: int


@dataclasses.dataclass(frozen=True)
class PciCapability:
    """A capability a device model adds, standard or extended.

    ``body`` is the whole structure including its header bytes (the space
    fills in the id, version and next pointer); ``wmask`` gives the
    guest-writable bits per byte (empty: all read-only).  ``cap_id`` is a
    standard id (``PCI_CAP_ID_*``) in :attr:`PciConfigSpace` ``capabilities``,
    an extended one (``PCI_EXT_CAP_ID_*``) in ``ext_capabilities``.
    """

    cap_id: int
    body: bytes
    wmask: bytes = b""
    version: int = 1


@dataclasses.dataclass(frozen=True)
class PciIdentity:
    """Identification registers of a function."""

    vendor_id: int
    device_id: int
    class_code: int
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    revision: int = 0


class PciConfigSpace:
    """The 4 KiB configuration space of one PCI Express endpoint function."""

    def __init__(
        self,
        identity: PciIdentity,
        bars: dict[int, BarLayout],
        *,
        intx: bool = True,
        msix: MsixLayout | None = None,
        pcie_type: int = uapi.PCI_EXP_TYPE_ENDPOINT,
        capabilities: Sequence[PciCapability] = (),
        ext_capabilities: Sequence[PciCapability] = (),
    ) -> None:
        self.identity = identity
        self.bars = dict(bars)
        self._check_bars()
        self._initial = bytearray(uapi.PCI_CFG_SPACE_EXP_SIZE)
        self._wmask = bytearray(uapi.PCI_CFG_SPACE_EXP_SIZE)
        self._w1cmask = bytearray(uapi.PCI_CFG_SPACE_EXP_SIZE)
        self._build_header(intx)
        self._build_capabilities(msix, pcie_type, capabilities)
        self._build_ext_capabilities(ext_capabilities)
        self._space = bytearray(self._initial)

    def _check_bars(self) -> None:
        for index, bar in self.bars.items():
            if not 0 <= index < uapi.PCI_NUM_BARS:
                raise PciConfigError(f"BAR index {index}: expected 0..{uapi.PCI_NUM_BARS - 1}")
            if bar.size < uapi.PCI_MIN_MEM_BAR_SIZE or bar.size & (bar.size - 1):
                raise PciConfigError(
                    f"BAR{index} size {bar.size:#x}: expected a power of two "
                    f">= {uapi.PCI_MIN_MEM_BAR_SIZE}"
                )
            if not bar.is_64bit and bar.size > 1 << _DWORD_BITS:
                raise PciConfigError(f"BAR{index} size {bar.size:#x}: too large for 32 bits")
            if bar.is_64bit and (index + 1 >= uapi.PCI_NUM_BARS or index + 1 in self.bars):
                raise PciConfigError(f"BAR{index} is 64-bit: BAR{index + 1} must be free")

    def _put(self, offset: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        self._initial[offset : offset + size] = value.to_bytes(size, "little")
        self._wmask[offset : offset + size] = wmask.to_bytes(size, "little")
        self._w1cmask[offset : offset + size] = w1c.to_bytes(size, "little")

    def _build_header(self, intx: bool) -> None:
        ident = self.identity
        self._put(uapi.PCI_VENDOR_ID, 2, ident.vendor_id)
        self._put(uapi.PCI_DEVICE_ID, 2, ident.device_id)
        self._put(uapi.PCI_COMMAND, 2, 0, wmask=uapi.PCI_COMMAND_WRITABLE)
        self._put(uapi.PCI_STATUS, 2, uapi.PCI_STATUS_CAP_LIST, w1c=uapi.PCI_STATUS_W1C)
        self._put(uapi.PCI_REVISION_ID, 1, ident.revision)
        self._put(uapi.PCI_CLASS_PROG, 3, ident.class_code)
        self._put(uapi.PCI_CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        self._put(uapi.PCI_HEADER_TYPE, 1, uapi.PCI_HEADER_TYPE_NORMAL)
        self._put(uapi.PCI_SUBSYSTEM_VENDOR_ID, 2, ident.subsystem_vendor_id)
        self._put(uapi.PCI_SUBSYSTEM_ID, 2, ident.subsystem_id)
        self._put(uapi.PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)
        self._put(uapi.PCI_INTERRUPT_PIN, 1, uapi.PCI_INTERRUPT_PIN_INTA if intx else 0)
        for index, bar in self.bars.items():
            offset = uapi.PCI_BASE_ADDRESS_0 + index * uapi.PCI_BAR_SIZE
            size_mask = bar.size - 1
            low_mask = ~size_mask & _DWORD_MASK & ~uapi.PCI_BASE_ADDRESS_MEM_FLAGS
            self._put(offset, uapi.PCI_BAR_SIZE, bar.flag_bits(), wmask=low_mask)
            if bar.is_64bit:
                high_mask = ~(size_mask >> _DWORD_BITS) & _DWORD_MASK
                self._put(offset + uapi.PCI_BAR_SIZE, uapi.PCI_BAR_SIZE, 0, wmask=high_mask)

    def _build_capabilities(
        self, msix: MsixLayout | None, pcie_type: int, extra: Sequence[PciCapability]
    ) -> None:
        caps: list[tuple[int, bytes]] = []
        pcie = bytearray(uapi.PCI_EXP_CAP_V2_SIZE)
        flags = uapi.PCI_EXP_FLAGS_VERSION_2 | (pcie_type << uapi.PCI_EXP_FLAGS_TYPE_SHIFT)
        pcie[uapi.PCI_EXP_FLAGS : uapi.PCI_EXP_FLAGS + 2] = flags.to_bytes(2, "little")
        lnkcap = uapi.PCI_EXP_LNKCAP_X1_2G5.to_bytes(4, "little")
        pcie[uapi.PCI_EXP_LNKCAP : uapi.PCI_EXP_LNKCAP + 4] = lnkcap
        lnksta = uapi.PCI_EXP_LNKSTA_X1_2G5.to_bytes(2, "little")
        pcie[uapi.PCI_EXP_LNKSTA : uapi.PCI_EXP_LNKSTA + 2] = lnksta
        caps.append((uapi.PCI_CAP_ID_EXP, bytes(pcie)))
        if msix is not None:
            if msix.bar not in self.bars:
                raise PciConfigError(f"MSI-X table BAR{msix.bar} is not declared")
            msix_cap = bytearray(uapi.PCI_MSIX_CAP_SIZE)
            table = msix.table_offset | msix.bar
            msix_cap[uapi.PCI_MSIX_TABLE : uapi.PCI_MSIX_TABLE + 4] = table.to_bytes(4, "little")
            pba = msix.pba_offset | msix.bar
            msix_cap[uapi.PCI_MSIX_PBA : uapi.PCI_MSIX_PBA + 4] = pba.to_bytes(4, "little")
            caps.append((uapi.PCI_CAP_ID_MSIX, bytes(msix_cap)))
        for cap in extra:
            if len(cap.body) % 4 or len(cap.body) < uapi.PCI_CAP_HEADER:
                raise PciConfigError(
                    f"capability {cap.cap_id:#x}: {len(cap.body)} bytes, expected a multiple "
                    f"of 4 (Linux masks the next pointer to a dword) of at least "
                    f"{uapi.PCI_CAP_HEADER}"
                )
        builtin = len(caps)
        caps.extend((cap.cap_id, cap.body) for cap in extra)
        end = uapi.PCI_CAP_FIRST + sum(len(body) for _, body in caps)
        if end > uapi.PCI_CFG_SPACE_SIZE:
            raise PciConfigError(
                f"capabilities end at {end:#x}: expected <= {uapi.PCI_CFG_SPACE_SIZE:#x}"
            )
        offset = uapi.PCI_CAP_FIRST
        self._put(uapi.PCI_CAPABILITY_LIST, 1, offset)
        for position, (cap_id, body) in enumerate(caps):
            following = offset + len(body)
            next_offset = following if position + 1 < len(caps) else 0
            self._initial[offset : offset + len(body)] = body
            self._initial[offset] = cap_id
            self._initial[offset + uapi.PCI_CAP_LIST_NEXT] = next_offset
            if cap_id == uapi.PCI_CAP_ID_EXP:
                self._put(offset + uapi.PCI_EXP_DEVCTL, 2, 0, wmask=uapi.PCI_EXP_DEVCTL_WRITABLE)
            if cap_id == uapi.PCI_CAP_ID_MSIX and msix is not None:
                writable = uapi.PCI_MSIX_FLAGS_ENABLE | uapi.PCI_MSIX_FLAGS_MASKALL
                self._put(offset + uapi.PCI_MSIX_FLAGS, 2, msix.vectors - 1, wmask=writable)
            if position >= builtin:
                self._apply_wmask(offset, extra[position - builtin])
            offset = following

    def _apply_wmask(self, offset: int, cap: PciCapability) -> None:
        if cap.wmask and len(cap.wmask) != len(cap.body):
            raise PciConfigError(
                f"capability {cap.cap_id:#x}: wmask is {len(cap.wmask)} bytes, "
                f"expected {len(cap.body)} (the body's length)"
            )
        self._wmask[offset : offset + len(cap.wmask)] = cap.wmask

    def _build_ext_capabilities(self, caps: Sequence[PciCapability]) -> None:
        """Chain ``caps`` from 0x100; the header dword is id, version, next."""
        offset = uapi.PCI_EXT_CAP_FIRST
        for position, cap in enumerate(caps):
            following = offset + _align_dword(len(cap.body))
            if following > uapi.PCI_CFG_SPACE_EXP_SIZE or len(cap.body) < uapi.PCI_EXT_CAP_HEADER:
                raise PciConfigError(
                    f"extended capability {cap.cap_id:#x} ({len(cap.body)} bytes at "
                    f"{offset:#x}): expected a header and an end <= "
                    f"{uapi.PCI_CFG_SPACE_EXP_SIZE:#x}"
                )
            next_offset = following if position + 1 < len(caps) else 0
            header = (
                cap.cap_id
                | cap.version << uapi.PCI_EXT_CAP_VER_SHIFT
                | next_offset << uapi.PCI_EXT_CAP_NEXT_SHIFT
            )
            self._initial[offset : offset + len(cap.body)] = cap.body
            self._initial[offset : offset + uapi.PCI_EXT_CAP_HEADER] = header.to_bytes(
                uapi.PCI_EXT_CAP_HEADER, "little"
            )
            self._apply_wmask(offset, cap)
            offset = following

    @property
    def size(self) -> int:
        """Size of the config region (extended space included)."""
        return len(self._space)

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (the caller has bounds-checked)."""
        return bytes(self._space[offset : offset + size])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a guest write: writable bits change, W1C bits clear, the rest stay."""
        for position, byte in enumerate(data):
            at = offset + position
            wmask = self._wmask[at]
            kept = self._space[at] & ~wmask
            cleared = byte & self._w1cmask[at]
            self._space[at] = ((kept | (byte & wmask)) & ~cleared) & 0xFF

    def read_u16(self, offset: int) -> int:
        """A 16-bit register."""
        return int.from_bytes(self._space[offset : offset + 2], "little")

    def bar_address(self, index: int) -> int:
        """The address currently programmed into BAR ``index`` (0 if unassigned)."""
        offset = uapi.PCI_BASE_ADDRESS_0 + index * uapi.PCI_BAR_SIZE
        low = int.from_bytes(self._space[offset : offset + 4], "little")
        address = low & ~uapi.PCI_BASE_ADDRESS_MEM_FLAGS & _DWORD_MASK
        bar = self.bars.get(index)
        if bar is not None and bar.is_64bit:
            high = int.from_bytes(self._space[offset + 4 : offset + 8], "little")
            address |= high << _DWORD_BITS
        return address

    def reset(self) -> None:
        """Back to the power-on values."""
        self._space[:] = self._initial


def _align_dword(size: int) -> int:
    return (size + 3) & ~3
