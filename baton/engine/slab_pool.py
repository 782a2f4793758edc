"""SlabPool: the memory of the KV slabs a batch let go, kept to hold its next ones.

A segment replaces its slab whenever it grows or shrinks (segment.py, `_relayout`): a new slab is allocated, the
live KV copied into it and the old one dropped; a segment whose rows have all left drops its slab too. Memory fresh
from the operating system costs a page fault, and a page zeroed by the kernel, the first time each 4 KiB of it is
written, inside the decode step that grew the slab: through `baton serve` on a 2-core CPU VM (machine K in
docs/benchmarks.md) new slabs were made at 0.75 GB/s (2.36 GB in 3.15 s over one `mixed` run, every row stalled
meanwhile), slabs from kept memory at 33 GB/s. So a CPU batch keeps the slabs its segments drop, up to `max_bytes`,
and carves a new slab out of the smallest kept buffer that holds it (and is at most twice its size, so a small
segment never pins a large buffer): memory already written, no faults. On CUDA the caching allocator does this
already; the pool there is empty (max_bytes 0).

Invariant kept here: a buffer is in the pool only while no slab views it, and `take` hands it out as one slab.
Every slab `take` returns is zeroed (padding columns must hold finite values: attention masks them out by their
scores, and zero weight times NaN would still be NaN).
"""

from __future__ import annotations

import math

import torch

# What a CPU batch keeps of the slabs it let go (DecodeBatch): about two relayouts' worth of a full batch of
# smollm2-135m rows of a few hundred tokens (a slab of 32 rows x 640 columns is 0.94 GB).
CPU_POOL_BYTES = 2 << 30


class SlabPool:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._free: list[torch.Tensor] = []  # flat buffers no slab views, oldest first

    @property
    def bytes(self) -> int:
        """Bytes held for reuse (not counting the slabs in use)."""
        return sum(b.nbytes for b in self._free)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed tensor of `shape`: a view of a kept buffer when one fits, else new memory."""
        n = math.prod(shape)
        fits = [b for b in self._free if b.dtype == dtype and b.device == device and n <= b.numel() <= 2 * n]
        if not fits:
            return torch.zeros(shape, dtype=dtype, device=device)
        buf = min(fits, key=lambda b: b.numel())
        self._free = [b for b in self._free if b is not buf]
        return buf[:n].view(shape).zero_()

    def give(self, slab: torch.Tensor) -> None:
        """Keep the memory behind `slab`, which nothing uses any more, for a later `take`; the oldest kept
        buffers go when the pool would hold more than max_bytes."""
        if self.max_bytes <= 0:
            return
        buf = slab._base if slab._base is not None else slab  # a slab taken from the pool views its buffer
        if not buf.is_contiguous() or buf.nbytes > self.max_bytes:
            return
        self._free.append(buf.view(-1))
        while self.bytes > self.max_bytes:
            self._free.pop(0)
