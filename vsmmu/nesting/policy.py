"""The C_BAD_STE policy: what the guest sees when its STE cannot be installed or used.

Two modes, chosen at start-up (``vsmmu serve --cbadste-policy``):

``event`` (default; what the kernel maintainers describe for a VMM)
    * a guest STE whose ``IOMMU_HWPT_ALLOC`` fails with **EIO** (bits outside
      the nesting masks, a Config the host refuses, an EATS the host does not
      accept) is replaced by the V=0 vSTE — an abort STE that reports
      C_BAD_STE — and a **C_BAD_STE** record for that StreamID is written to
      the guest event queue at once; the CFGI_STE itself succeeds.  The QMP
      events ``VSMMU_HWPT_ALLOC`` (with the errno) and ``VSMMU_EVENT`` say so;
    * an ILLEGAL guest STE (for the features the vSMMU advertises) is
      installed as V=0 without an immediate record (the guest gets C_BAD_STE
      when a transaction arrives, as the architecture says).

``qemu-accel`` (QEMU's accelerated SMMUv3)
    * an EIO from ``IOMMU_HWPT_ALLOC`` or an ILLEGAL guest STE makes the
      CFGI_STE fail with **CERROR_ILL** (the command queue stops there) and the
      stream is left on the abort proxy; no event is written.

In both modes, a transaction (an endpoint's DMA or ``x-vsmmu-inject-transaction``)
from a StreamID whose guest STE is V=0 or ILLEGAL yields **C_BAD_STE**, one
beyond the stream table yields **C_BAD_STREAMID**, and one whose STE cannot be
fetched yields **F_STE_FETCH**.  For an endpoint the first comes from the host
(its V=0 vSTE, reported through the vEVENTQ with the vSID); the others, and
every transaction on a StreamID without an endpoint, are produced by the
translator from the guest's stream table.
"""

from __future__ import annotations

import enum
import logging

logger = logging.getLogger(__name__)


class CBadStePolicy(enum.Enum):
    """How an STE the host refuses is reported to the guest (see the module docstring)."""

    EVENT = "event"
    QEMU_ACCEL = "qemu-accel"
