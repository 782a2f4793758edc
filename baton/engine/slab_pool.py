"""SlabPool: where a batch's KV slabs come from, and where their memory goes when the batch lets them go.

A segment replaces its slab whenever it grows or shrinks (segment.py, `_relayout`): a new slab is taken, the live
KV copied into it and the old one given back; a segment whose rows have all left gives its slab back too. Memory
fresh from the operating system costs a page fault, and a page zeroed by the kernel, the first time each 4 KiB of
it is written, inside the decode step that grew the slab: through `baton serve` on 2-core CPU VMs (machines K and
L in docs/benchmarks.md) new slabs were made at 0.7-0.75 GB/s (the batch filling up to 32 rows: 0.94 GB in 1.5 s,
every row stalled meanwhile), slabs from memory already written at 33 GB/s.

So on a CPU the pool hands out slabs carved from chunks of memory it keeps:
- `reserve` lays out one chunk at start and writes it once (as vLLM lays out its CPU KV cache space at start), so
  the slabs of a batch filling up cost no page faults at all; the reserved chunk is never given back.
- A slab that fits in no free run of any chunk gets a chunk of its own, new memory; given back, such a chunk is
  kept for later slabs while the idle chunks kept come to at most `max_bytes` (oldest dropped first).
A slab is carved from the smallest free run that holds it (best fit); runs given back merge with their free
neighbours, so a reserved chunk serves slabs of any size for as long as the process lives. On CUDA the caching
allocator does all this already: the pool there keeps nothing (max_bytes 0, no reserve).

Invariants kept here: each chunk's free runs are sorted, disjoint and never adjacent (merged on give), and no two
slabs handed out overlap (a run is free exactly while no slab views it). Every slab `take` returns is zeroed
(padding columns must hold finite values: attention masks them out by their scores, and zero weight times NaN
would still be NaN).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch

# What a CPU batch keeps of the chunks it let go beyond its reserve (DecodeBatch): about two relayouts' worth of
# a full batch of smollm2-135m rows of a few hundred tokens (a slab of 32 rows x 640 columns is 0.94 GB).
CPU_POOL_BYTES = 2 << 30
# The default reserve is capped here: vLLM's CPU KV cache space is 4 GiB unless told (VLLM_CPU_KVCACHE_SPACE).
MAX_DEFAULT_RESERVE = 4 << 30
RESERVE_HELP = ("bytes of KV slab memory laid out and written at start on a CPU, so that the batch's slabs do not "
                "wait on new memory (baton/engine/slab_pool.py; auto: the KV of the tokens the batch is sized for, "
                "a decode worker's --max-kv-tokens, and a quarter more, at most 4 GiB; 0: none)")
# Slabs start on 64-byte boundaries (a cache line; a full AVX-512 vector).
ALIGN_BYTES = 64


def _run_length(n: int, dtype: torch.dtype) -> int:
    """The elements a slab of n elements takes from a chunk: rounded up so that the next slab starts aligned."""
    size = max(1, ALIGN_BYTES // dtype.itemsize)
    return -(-n // size) * size


def default_reserve(kv_tokens: int, bytes_per_token: int) -> int:
    """The reserve for a batch sized for `kv_tokens` (ModelSpec.batch_kv_tokens): their KV and a quarter more for
    padding and room to grow, at most MAX_DEFAULT_RESERVE."""
    return min(MAX_DEFAULT_RESERVE, kv_tokens * bytes_per_token * 5 // 4)


@dataclass(eq=False)  # compared by identity (list.remove): a field-wise == would compare the buffers' elements
class _Chunk:
    buf: torch.Tensor  # flat: [elements]
    reserved: bool  # laid out by `reserve`: never dropped
    free: list[tuple[int, int]] = field(default_factory=list)  # runs (start, length) in elements, by start

    @property
    def free_elements(self) -> int:
        return sum(n for _, n in self.free)

    @property
    def idle(self) -> bool:
        return self.free_elements == self.buf.numel()

    def holds(self, slab: torch.Tensor) -> bool:
        return slab.untyped_storage().data_ptr() == self.buf.untyped_storage().data_ptr()

    def carve(self, i: int, n: int) -> torch.Tensor:
        """Take the first n elements of free run i."""
        start, length = self.free[i]
        if length == n:
            del self.free[i]
        else:
            self.free[i] = (start + n, length - n)
        return self.buf[start : start + n]

    def put_back(self, start: int, n: int) -> None:
        """Free [start, start + n), merged with the free runs it touches."""
        i = bisect.bisect(self.free, (start, n))
        assert (i == 0 or sum(self.free[i - 1]) <= start) and (i == len(self.free) or start + n <= self.free[i][0]), \
            "a slab given back twice"
        if i < len(self.free) and start + n == self.free[i][0]:
            n += self.free.pop(i)[1]
        if i > 0 and sum(self.free[i - 1]) == start:
            start, n = self.free[i - 1][0], self.free[i - 1][1] + n
            i -= 1
            del self.free[i]
        self.free.insert(i, (start, n))


class SlabPool:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes  # idle chunks kept beyond the reserve (0: keep nothing)
        self._chunks: list[_Chunk] = []  # oldest first

    @property
    def bytes(self) -> int:
        """Bytes held for reuse: the free runs of every chunk (the slabs in use not counted)."""
        return sum(c.free_elements * c.buf.element_size() for c in self._chunks)

    @property
    def reserved_bytes(self) -> int:
        return sum(c.buf.nbytes for c in self._chunks if c.reserved)

    def reserve(self, nbytes: int, dtype: torch.dtype, device: torch.device) -> None:
        """Lay out `nbytes` for slabs now, every page written once, so that no later slab that fits faults."""
        n = nbytes // dtype.itemsize
        if n > 0:
            self._chunks.append(_Chunk(torch.zeros(n, dtype=dtype, device=device), True, [(0, n)]))

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A zeroed tensor of `shape`: carved from a kept chunk when one has room, else new memory."""
        n = math.prod(shape)
        m = _run_length(n, dtype)
        runs = [(length, k, i) for k, c in enumerate(self._chunks) if c.buf.dtype == dtype and c.buf.device == device
                for i, (_, length) in enumerate(c.free) if length >= m]
        if runs:
            _, k, i = min(runs)
            return self._chunks[k].carve(i, m)[:n].view(shape).zero_()
        if self.max_bytes <= 0:
            return torch.zeros(shape, dtype=dtype, device=device)
        chunk = _Chunk(torch.zeros(m, dtype=dtype, device=device), False)
        self._chunks.append(chunk)
        return chunk.buf[:n].view(shape)

    def give(self, slab: torch.Tensor) -> None:
        """Free the memory behind `slab`, which nothing uses any more, for a later `take`; idle chunks of new
        memory beyond max_bytes are dropped, oldest first. A slab from no chunk is left to the allocator."""
        chunk = next((c for c in self._chunks if c.holds(slab)), None)
        if chunk is None:
            return
        chunk.put_back(int(slab.storage_offset()), _run_length(slab.numel(), slab.dtype))
        idle = [c for c in self._chunks if c.idle and not c.reserved]
        while idle and sum(c.buf.nbytes for c in idle) > self.max_bytes:
            self._chunks.remove(idle.pop(0))
