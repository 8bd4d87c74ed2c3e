"""What every emulated endpoint is, and its only way to guest memory.

An :class:`Endpoint` is a PCI function (:attr:`Endpoint.pci`, served by one
:class:`~vsmmu.vfio_user.VfioUserServer`) whose DMA goes through a
:class:`DmaPort` the service binds at startup: with the sim backend the port
translates IOVAs through the nested SMMU model, so nothing an endpoint reads
or writes bypasses translation.  A refused access raises
:class:`EndpointDmaError`; endpoints treat it as the device would (the request
stops, the fault is logged) and never let it escape a register handler.

:func:`make_endpoint` builds an endpoint from a command-line spec such as
``"virtio-rng,seed=1,ats=on"``.
"""

from __future__ import annotations

import abc
import logging
from typing import Protocol

from vsmmu.vfio_user import PciFunction

logger = logging.getLogger(__name__)


DMA_PAGE_SIZE = 4096
"""The smallest page an IOMMU translates: an access inside one is allowed or refused whole."""


class EndpointError(Exception):
    """Errors of the endpoints layer."""


class EndpointSpecError(EndpointError):
    """An endpoint spec string that names no endpoint or an unknown option."""


class EndpointDmaError(EndpointError):
    """A DMA the IOMMU (or the DMA map) refused.

    ``iova`` is the first address of the refused access, ``reason`` what the
    translation said; ``length`` and ``write`` describe the access.
    """

    def __init__(self, iova: int, reason: str, *, length: int = 0, write: bool = False) -> None:
        self.iova = iova
        self.reason = reason
        self.length = length
        self.write = write
        direction = "write" if write else "read"
        super().__init__(f"DMA {direction} iova={iova:#x} length={length}: {reason}")


class DmaPort(Protocol):
    """The endpoint's only way to guest memory: accesses by IOVA."""

    def read(self, iova: int, length: int) -> bytes:
        """``length`` bytes at ``iova``.

        :raises EndpointDmaError: the access was refused.
        """
        ...

    def write(self, iova: int, data: bytes) -> None:
        """Store ``data`` at ``iova``.

        :raises EndpointDmaError: the access was refused.
        """
        ...

    def views(self, iova: int, length: int, *, write: bool) -> list[memoryview]:
        """The host memory behind ``[iova, iova + length)``, translated, in order.

        For moving bulk data without a copy (``os.preadv`` straight into guest
        RAM).  The whole range is translated and checked before anything is
        returned, so a refusal leaves guest memory untouched.  Use the views at
        once: a later unmap or invalidation does not revoke them.

        :raises EndpointDmaError: some page of the range was refused.
        """
        ...


class UnboundDmaPort:
    """The port of an endpoint nobody has bound yet: every access is refused."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def read(self, iova: int, length: int) -> bytes:
        """Refuse: no port bound."""
        raise EndpointDmaError(iova, f"{self.endpoint}: no DMA port bound", length=length)

    def write(self, iova: int, data: bytes) -> None:
        """Refuse: no port bound."""
        raise EndpointDmaError(
            iova, f"{self.endpoint}: no DMA port bound", length=len(data), write=True
        )

    def views(self, iova: int, length: int, *, write: bool) -> list[memoryview]:
        """Refuse: no port bound."""
        raise EndpointDmaError(
            iova, f"{self.endpoint}: no DMA port bound", length=length, write=write
        )


class Endpoint(abc.ABC):
    """An emulated PCI function whose DMA goes through a :class:`DmaPort`.

    Subclasses set :attr:`pci` in their constructor and implement
    :meth:`reset`.
    """

    #: Name used in logs and over QMP, e.g. ``"virtio-rng0"``.
    name: str
    #: The PCI function one :class:`~vsmmu.vfio_user.VfioUserServer` serves.
    pci: PciFunction

    def __init__(self, name: str) -> None:
        self.name = name
        self.dma: DmaPort = UnboundDmaPort(name)

    def bind_dma(self, port: DmaPort) -> None:
        """Route all of this endpoint's DMA through ``port`` (the service does it at startup)."""
        logger.info("%s: DMA port %s bound", self.name, type(port).__name__)
        self.dma = port

    @abc.abstractmethod
    def reset(self) -> None:
        """Device reset: back to power-on state (also run on client disconnect)."""


_BOOLEAN_WORDS = {"on": True, "yes": True, "true": True, "1": True,
                  "off": False, "no": False, "false": False, "0": False}  # fmt: skip


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``"kind,key=value,..."`` into the kind and its options.

    :raises EndpointSpecError: empty kind, an option without ``=``, or a repeated key.
    """
    kind, *items = [part.strip() for part in spec.split(",")]
    if not kind:
        raise EndpointSpecError(f"endpoint spec {spec!r}: expected 'kind[,key=value...]'")
    options: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise EndpointSpecError(f"endpoint spec {spec!r}: option {item!r} is not key=value")
        if key in options:
            raise EndpointSpecError(f"endpoint spec {spec!r}: option {key!r} given twice")
        options[key] = value
    return kind, options


def spec_bool(spec: str, key: str, value: str) -> bool:
    """An on/off option value.

    :raises EndpointSpecError: not one of on/off/yes/no/true/false/1/0.
    """
    try:
        return _BOOLEAN_WORDS[value.lower()]
    except KeyError:
        raise EndpointSpecError(
            f"endpoint spec {spec!r}: {key}={value!r}, expected on or off"
        ) from None


def spec_int(spec: str, key: str, value: str, limit: int) -> int:
    """A non-negative integer option (decimal or 0x-hex) below ``limit``.

    :raises EndpointSpecError: not an integer, negative, or too large.
    """
    try:
        number = int(value, 0)
    except ValueError:
        raise EndpointSpecError(
            f"endpoint spec {spec!r}: {key}={value!r}, expected an integer"
        ) from None
    if not 0 <= number < limit:
        raise EndpointSpecError(
            f"endpoint spec {spec!r}: {key}={number}, expected 0 <= {key} < {limit:#x}"
        )
    return number
