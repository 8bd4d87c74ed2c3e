"""Where bytes a guest read from ``/dev/hwrng`` lie in a virtio-rng endpoint's stream.

The endpoint (:mod:`vsmmu.endpoints.virtio_rng`) hands out a seeded stream;
these functions check a guest's sample against it, allowing for the bytes
Linux's own hwrng readers take in between.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

from vsmmu.endpoints.virtio_rng import expected_stream


def locate_in_stream(seed: int, sample: bytes, start: int, end: int) -> int | None:
    """The first offset in ``[start, end)`` where ``sample`` begins in the stream, or None."""
    window = expected_stream(seed, start, end - start + len(sample))
    found = window.find(sample)
    return None if found < 0 or start + found >= end else start + found


#: Every consumer in the Linux hwrng core takes multiples of 32 bytes
#: (``add_early_randomness`` 32, the fill kthread and ``/dev/hwrng`` 64 each).
HWRNG_GRANULE = 32
#: Largest single gap :func:`match_stream_blocks` explains inside one block.
MAX_GAP_GRANULES = 4
#: Most gaps :func:`match_stream_blocks` explains inside one block: a take of the fill
#: kthread can straddle virtio-rng's internal buffer and leave two gaps a few granules apart.
MAX_GAPS_PER_BLOCK = 2


@dataclasses.dataclass(frozen=True)
class StreamMatch:
    """Where a guest's read lies in the stream: its blocks, and the bytes it skipped."""

    #: Stream offset of each block's first byte.
    block_offsets: tuple[int, ...]
    #: ``(block index, bytes skipped inside it)`` for each gap found.
    gaps: tuple[tuple[int, int], ...]
    #: The stream bytes each block holds, gaps left out: what the guest must have read.
    block_bytes: tuple[bytes, ...] = ()

    @property
    def skipped(self) -> int:
        """Stream bytes other consumers took in the middle of the read."""
        return sum(gap for _, gap in self.gaps)


def match_stream_blocks(
    seed: int, start: int, digests: Sequence[bytes], block_size: int
) -> StreamMatch | None:
    """Check a guest's read, given as the SHA-256 of each ``block_size`` block, against the stream.

    The read starts at ``start``.  Linux's hwrng core serialises its readers
    per 64-byte chunk, and its fill kthread takes a chunk now and then (every
    ``max(1 s, uptime / 2)`` early in boot), so a long ``/dev/hwrng`` read may
    miss whole :data:`HWRNG_GRANULE` multiples of the stream.  A block whose
    digest is not the stream's at the expected offset is matched against the
    stream with up to :data:`MAX_GAPS_PER_BLOCK` such gaps (each at most
    :data:`MAX_GAP_GRANULES` granules) at granule boundaries inside it.  Every
    byte the guest read is still checked.  Returns None when some block is not
    explained that way.
    """
    offset = start
    offsets: list[int] = []
    gaps: list[tuple[int, int]] = []
    contents: list[bytes] = []
    reach = MAX_GAPS_PER_BLOCK * MAX_GAP_GRANULES * HWRNG_GRANULE
    for index, digest in enumerate(digests):
        window = expected_stream(seed, offset, block_size + reach)
        offsets.append(offset)
        found = _explain_block(window, block_size, digest)
        if found is None:
            return None
        block_gaps, content = found
        gaps.extend((index, gap) for gap in block_gaps)
        contents.append(content)
        offset += block_size + sum(block_gaps)
    return StreamMatch(tuple(offsets), tuple(gaps), tuple(contents))


def _explain_block(
    window: bytes, block_size: int, digest: bytes
) -> tuple[list[int], bytes] | None:
    """The fewest whole-granule gaps that make ``window`` hash to ``digest``, and the bytes."""
    for count in range(MAX_GAPS_PER_BLOCK + 1):
        found = _with_gaps(window, block_size, digest, count, 0, b"", [])
        if found is not None:
            return found
    return None


def _with_gaps(
    window: bytes, size: int, digest: bytes, count: int, cut_from: int, head: bytes,
    taken: list[int],
) -> tuple[list[int], bytes] | None:
    """Try ``count`` more gaps at granule boundaries at or after ``cut_from`` of the output.

    ``head`` is the output so far and ``window`` the stream from where ``head`` ends;
    with no gaps left, the rest of the block is the stream's next bytes.
    """
    if count == 0:
        candidate = head + window[: size - len(head)]
        return (taken, candidate) if hashlib.sha256(candidate).digest() == digest else None
    for cut in range(cut_from, size, HWRNG_GRANULE):
        prefix = head + window[: cut - len(head)]
        for granules in range(1, MAX_GAP_GRANULES + 1):
            gap = granules * HWRNG_GRANULE
            found = _with_gaps(window[cut - len(head) + gap :], size, digest, count - 1,
                               cut + HWRNG_GRANULE, prefix, [*taken, gap])
            if found is not None:
                return found
    return None
