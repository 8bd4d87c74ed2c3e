"""The vSMMU sanitizer: guest driver programming mistakes, reported as they happen.

See :mod:`vsmmu.sanitizer.core` for the kinds and the SMMUv3 rule each
enforces, :mod:`vsmmu.sanitizer.rules` for the rules as pure functions.
Layer: above :mod:`vsmmu.nesting` (it reads the model, the translator and
the sim's caches), below the service.
"""

from vsmmu.sanitizer.core import (
    GuestError,
    GuestErrorKind,
    SanitizedDmaPort,
    Sanitizer,
)

__all__ = ["GuestError", "GuestErrorKind", "SanitizedDmaPort", "Sanitizer"]
