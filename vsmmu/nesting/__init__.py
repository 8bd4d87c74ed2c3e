"""The nesting translator: vSMMU configuration and commands in, iommufd calls out.

Public API:

* :class:`~vsmmu.nesting.translator.NestingTranslator` — the model's ConfigSink
  (``bind``, ``add_endpoint``, ``map_guest_ram``/``unmap_guest_ram``,
  ``drain_veventq``, ``transaction``/``dma_read``/``dma_write``, ``streams``,
  ``guest_object_ids``, ``close``);
* :class:`~vsmmu.nesting.translator.TranslatorObserver` — hooks for QMP events;
* :class:`~vsmmu.nesting.policy.CBadStePolicy` — the documented C_BAD_STE policy;
* :mod:`~vsmmu.nesting.routes` — where each StreamID's transactions go, decided
  when configuration changes (:class:`~vsmmu.nesting.routes.Route`);
* :mod:`~vsmmu.nesting.vste` — guest STE → vSTE.
"""

from vsmmu.nesting.policy import CBadStePolicy
from vsmmu.nesting.routes import NestingError, Route, StreamFault, TransactionResult
from vsmmu.nesting.state import GuestObjects, NestedHwpt, Stream, TranslatorObserver
from vsmmu.nesting.translator import NestingTranslator
from vsmmu.nesting.vste import ABORT_VSTE, BYPASS_VSTE, INVALID_VSTE, VsteWords, vste_for

__all__ = [
    "ABORT_VSTE", "BYPASS_VSTE", "INVALID_VSTE", "CBadStePolicy", "GuestObjects", "NestedHwpt",
    "NestingError", "NestingTranslator", "Route", "Stream", "StreamFault", "TransactionResult",
    "TranslatorObserver", "VsteWords", "vste_for",
]
