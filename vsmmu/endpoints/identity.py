"""A DMA port with NO IOMMU: IOVA == guest-physical address.

For tests of an endpoint alone (and nothing else): it reads and writes the
guest RAM QEMU mapped into the endpoint's own
:class:`~vsmmu.vfio_user.DmaMapTable`.  Behind the vSMMU the service binds a
port that translates through the backend instead.
"""

from __future__ import annotations

import logging

from vsmmu.endpoints.base import EndpointDmaError
from vsmmu.vfio_user import DmaError, DmaMapTable

logger = logging.getLogger(__name__)


class IdentityDmaPort:
    """Untranslated DMA over a DMA map table (test-only; no IOMMU in the path)."""

    def __init__(self, table: DmaMapTable) -> None:
        self.table = table
        self.reads = 0
        self.writes = 0

    def read(self, iova: int, length: int) -> bytes:
        """Guest memory at GPA ``iova``.

        :raises EndpointDmaError: not inside one readable, fd-backed mapping.
        """
        try:
            data = self.table.read(iova, length)
        except DmaError as exc:
            raise EndpointDmaError(iova, str(exc), length=length) from exc
        self.reads += 1
        return data

    def write(self, iova: int, data: bytes) -> None:
        """Store ``data`` at GPA ``iova``.

        :raises EndpointDmaError: not inside one writable, fd-backed mapping.
        """
        try:
            self.table.write(iova, data)
        except DmaError as exc:
            raise EndpointDmaError(iova, str(exc), length=len(data), write=True) from exc
        self.writes += 1

    def views(self, iova: int, length: int, *, write: bool) -> list[memoryview]:
        """Guest memory at GPA ``iova`` without a copy.

        :raises EndpointDmaError: not inside one fd-backed mapping with that access.
        """
        try:
            mapping = self.table.find(iova, length)
            if write and not mapping.writable:
                raise DmaError(f"DMA write gpa={iova:#x}: mapping is read-only")
            view = self.table.view(iova, length)
        except DmaError as exc:
            raise EndpointDmaError(iova, str(exc), length=length, write=write) from exc
        return [view]
