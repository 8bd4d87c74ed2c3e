"""The endpoint kinds ``--endpoint SPEC`` can name, and the factory that builds one."""

from __future__ import annotations

from collections.abc import Callable

from vsmmu.endpoints.base import Endpoint, EndpointSpecError, parse_spec
from vsmmu.endpoints.iommu_testdev import IommuTestdev
from vsmmu.endpoints.passthrough import VfioPassthrough
from vsmmu.endpoints.virtio_blk import VirtioBlk
from vsmmu.endpoints.virtio_rng import VirtioRng

_KINDS: dict[str, Callable[[str, dict[str, str]], Endpoint]] = {
    VirtioRng.KIND: VirtioRng.from_options,
    VirtioBlk.KIND: VirtioBlk.from_options,
    IommuTestdev.KIND: IommuTestdev.from_options,
}
"""Emulated endpoint kinds by name (a passed-through VFIO device is ``vfio=PATH``)."""


def make_endpoint(spec: str) -> Endpoint:
    """Build the endpoint a spec names, e.g. ``"virtio-rng,seed=1,ats=on,name=rng0"``.

    Kinds: ``virtio-rng`` (options ``seed``, ``ats``, ``name``; see
    :func:`vsmmu.endpoints.virtio_rng.VirtioRng.from_options`),
    ``virtio-blk`` (``file``, ``readonly``, ``serial``, ``ats``, ``name``; see
    :func:`vsmmu.endpoints.virtio_blk.VirtioBlk.from_options`),
    ``iommu-testdev`` (option ``name``; see
    :mod:`vsmmu.endpoints.iommu_testdev`) and ``vfio=PATH`` (a VFIO cdev passed
    through, option ``name``; see :mod:`vsmmu.endpoints.passthrough`).

    :raises EndpointSpecError: unknown kind or option, or a bad value.
    """
    kind, options = parse_spec(spec)
    passthrough, sep, path = kind.partition("=")
    if sep and passthrough == VfioPassthrough.KIND:
        return VfioPassthrough.from_options(spec, path, options)
    factory = _KINDS.get(kind)
    if factory is None:
        raise EndpointSpecError(
            f"endpoint spec {spec!r}: kind {kind!r}, expected one of {sorted(_KINDS)}"
        )
    return factory(spec, options)
