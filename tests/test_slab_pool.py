"""baton/engine/slab_pool.py: the slabs a batch lets go back its next ones, zeroed, within the pool's budget."""

from __future__ import annotations

import torch

from baton.engine.batch import DecodeBatch
from baton.engine.request import Request, SamplingParams
from baton.engine.slab_pool import SlabPool

CPU = torch.device("cpu")
SHAPE = (2, 2, 4, 2, 64, 8)  # [layers, 2, rows, kv_heads, cols, head_dim]: 64 KiB of float32


def test_a_slab_let_go_backs_the_next_one_zeroed() -> None:
    pool = SlabPool(1 << 20)
    old = pool.take(SHAPE, torch.float32, CPU)
    old.fill_(float("nan"))  # whatever a slab held, the next one starts from zeros
    ptr = old.data_ptr()
    pool.give(old)
    assert pool.bytes == old.numel() * 4
    new = pool.take((2, 2, 4, 2, 48, 8), torch.float32, CPU)  # smaller, more than half the buffer
    assert new.data_ptr() == ptr and pool.bytes == 0
    assert torch.equal(new, torch.zeros_like(new))
    pool.give(new)  # a slab carved from a buffer gives the whole buffer back
    assert pool.bytes == old.numel() * 4


def test_a_small_slab_never_pins_a_large_buffer() -> None:
    pool = SlabPool(1 << 20)
    big = pool.take(SHAPE, torch.float32, CPU)
    ptr = big.data_ptr()
    pool.give(big)
    small = pool.take((2, 2, 1, 2, 64, 8), torch.float32, CPU)  # a quarter: new memory
    assert small.data_ptr() != ptr and pool.bytes == big.numel() * 4
    other = pool.take(SHAPE, torch.float16, CPU)  # another dtype: new memory
    assert other.data_ptr() != ptr


def test_the_pool_keeps_at_most_its_budget_oldest_going_first() -> None:
    slab_bytes = 64 << 10
    pool = SlabPool(2 * slab_bytes)
    slabs = [pool.take(SHAPE, torch.float32, CPU) for _ in range(3)]
    ptrs = [s.data_ptr() for s in slabs]
    for s in slabs:
        pool.give(s)
    assert pool.bytes == 2 * slab_bytes
    assert {pool.take(SHAPE, torch.float32, CPU).data_ptr() for _ in range(2)} == set(ptrs[1:])
    off = SlabPool(0)
    off.give(off.take(SHAPE, torch.float32, CPU))
    assert off.bytes == 0


def test_a_batch_reuses_the_slab_of_a_segment_it_dropped() -> None:
    batch = DecodeBatch(2, 2, 8, torch.float32, CPU, max_rows=4)
    kv = torch.randn(2, 2, 2, 100, 8)  # [layers, 2, kv_heads, tokens, head_dim]
    first = Request("a", list(range(100)), SamplingParams(max_new_tokens=4))
    batch.concatenate([(first, kv)])
    ptr = batch.segments[0].kv.data_ptr()
    batch.evict({"a"})  # its segment is dropped: the slab goes to the pool, counted as held for KV
    assert not batch.segments and batch.pool.bytes > 0 and batch.allocated_bytes == batch.pool.bytes
    second = Request("b", list(range(1, 91)), SamplingParams(max_new_tokens=4))
    batch.concatenate([(second, kv[:, :, :, :90])])
    seg = batch.segments[0]
    assert seg.kv.data_ptr() == ptr and batch.pool.bytes == 0
    assert torch.equal(seg.row_kv(0), kv[:, :, :, :90])
