"""virtio-rng (virtio entropy device, id 4) whose bytes are a deterministic stream.

The device has one queue (``requestq``).  Each request's device-writable
buffers are filled, in chain order, with the next bytes of the stream; at most
:data:`MAX_REQUEST_BYTES` per request, so a hostile buffer length costs
nothing.  The stream position advances only when the used ring reports the
request, so a request stopped by a DMA fault is filled with the same bytes
when retried.

The generator (documented so anyone can recompute it without this code):
the stream for ``seed`` (0 <= seed < 2**64) is the concatenation, for block
index i = 0, 1, 2, ..., of

    SHA-256( b"vsmmu-virtio-rng\\0" || seed as 8 bytes little-endian
             || i as 8 bytes little-endian )

so byte ``offset`` is byte ``offset % 32`` of block ``offset // 32``.
:func:`expected_stream` returns any window of it (the harness's
:mod:`qmp_harness.hwrng` checks what a guest read against it).

The position resets to 0 on a function reset (QEMU's DEVICE_RESET, client
disconnect, :meth:`VirtioRng.reset`), not when the driver writes status 0:
a guest that rebinds its driver continues the stream, a rebooted machine
starts it again.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from vsmmu.endpoints import virtio_uapi as vu
from vsmmu.endpoints.base import EndpointSpecError, spec_bool, spec_int
from vsmmu.endpoints.virtio_pci import VirtioPciEndpoint
from vsmmu.endpoints.virtqueue import DescriptorChain

logger = logging.getLogger(__name__)

STREAM_DOMAIN = b"vsmmu-virtio-rng\0"
STREAM_BLOCK_SIZE = hashlib.sha256().digest_size
SEED_BYTES = 8
SEED_LIMIT = 1 << (8 * SEED_BYTES)
#: The most one request is filled with, whatever its buffers say.
MAX_REQUEST_BYTES = 64 * 1024
REQUESTQ = 0


def stream_block(seed: int, index: int) -> bytes:
    """Block ``index`` of the stream for ``seed`` (:data:`STREAM_BLOCK_SIZE` bytes)."""
    message = STREAM_DOMAIN + seed.to_bytes(SEED_BYTES, "little") + index.to_bytes(8, "little")
    return hashlib.sha256(message).digest()


def expected_stream(seed: int, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset + length)`` of the stream for ``seed``."""
    if length <= 0:
        return b""
    first = offset // STREAM_BLOCK_SIZE
    last = (offset + length - 1) // STREAM_BLOCK_SIZE
    blocks = b"".join(stream_block(seed, index) for index in range(first, last + 1))
    start = offset - first * STREAM_BLOCK_SIZE
    return blocks[start : start + length]


class VirtioRng(VirtioPciEndpoint):
    """The entropy device: one request queue filled from the seeded stream."""

    KIND = "virtio-rng"

    def __init__(self, name: str = "virtio-rng0", *, seed: int = 0, ats: bool = False) -> None:
        if not 0 <= seed < SEED_LIMIT:
            raise EndpointSpecError(f"virtio-rng seed {seed}: expected 0 <= seed < 2**64")
        self.seed = seed
        #: Stream offset of the next byte the device hands out (= bytes delivered).
        self.position = 0
        super().__init__(name, vu.VirtioDeviceId.ENTROPY, num_queues=1, ats=ats)

    @classmethod
    def from_options(cls, spec: str, options: dict[str, str]) -> VirtioRng:
        """Build from spec options ``seed``, ``ats``, ``name``.

        :raises EndpointSpecError: an unknown option or a bad value.
        """
        known = {"seed", "ats", "name"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise EndpointSpecError(
                f"endpoint spec {spec!r}: unknown option(s) {unknown}, expected {sorted(known)}"
            )
        return cls(
            options.get("name", "virtio-rng0"),
            seed=spec_int(spec, "seed", options.get("seed", "0"), SEED_LIMIT),
            ats=spec_bool(spec, "ats", options.get("ats", "off")),
        )

    def handle_request(self, queue: int, chain: DescriptorChain) -> int:
        """Fill the chain's writable buffers with the stream from :attr:`position`."""
        capacity = sum(descriptor.length for descriptor in chain.writable)
        total = min(capacity, MAX_REQUEST_BYTES)
        data = expected_stream(self.seed, self.position, total)
        done = 0
        for descriptor in chain.writable:
            if done == total:
                break
            piece = data[done : done + min(descriptor.length, total - done)]
            if piece:
                self.dma.write(descriptor.addr, piece)
            done += len(piece)
        return total

    def request_completed(self, queue: int, chain: DescriptorChain, written: int) -> None:
        """The guest now owns ``written`` more stream bytes."""
        self.position += written

    def device_reset(self) -> None:
        """The stream starts again at offset 0."""
        self.position = 0

    def stats(self) -> dict[str, Any]:
        """Transport counters plus the seed and the stream position."""
        return {**super().stats(), "seed": self.seed, "position": self.position}
