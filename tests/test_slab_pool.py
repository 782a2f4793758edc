"""baton/engine/slab_pool.py: slabs carved from kept memory, zeroed, never overlapping, within the pool's budget."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.engine.batch import DecodeBatch
from baton.engine.request import Request, SamplingParams
from baton.engine.slab_pool import SlabPool, default_reserve

CPU = torch.device("cpu")
SHAPE = (2, 2, 4, 2, 64, 8)  # [layers, 2, rows, kv_heads, cols, head_dim]: 64 KiB of float32


def span(t: torch.Tensor) -> tuple[int, int]:
    return t.data_ptr(), t.data_ptr() + t.nbytes


def test_a_slab_let_go_backs_the_next_one_zeroed() -> None:
    pool = SlabPool(1 << 20)
    old = pool.take(SHAPE, torch.float32, CPU)
    old.fill_(float("nan"))  # whatever a slab held, the next one starts from zeros
    ptr = old.data_ptr()
    pool.give(old)
    assert pool.bytes == old.numel() * 4
    new = pool.take((2, 2, 4, 2, 48, 8), torch.float32, CPU)  # smaller: carved from the same memory
    assert new.data_ptr() == ptr and pool.bytes == (old.numel() - new.numel()) * 4
    assert torch.equal(new, torch.zeros_like(new))
    pool.give(new)  # the run merges back with the rest of the chunk
    assert pool.bytes == old.numel() * 4
    again = pool.take(SHAPE, torch.float32, CPU)
    assert again.data_ptr() == ptr and pool.bytes == 0


def test_a_reserve_serves_slabs_of_any_size_without_new_memory() -> None:
    pool = SlabPool(0)  # nothing kept beyond the reserve
    pool.reserve(1 << 20, torch.float32, CPU)
    base = pool.take((1,), torch.float32, CPU).data_ptr()
    pool.give(pool.take((1,), torch.float32, CPU))
    small = pool.take((2, 2, 1, 2, 64, 8), torch.float32, CPU)
    big = pool.take(SHAPE, torch.float32, CPU)
    for t in (small, big):
        assert base <= t.data_ptr() and t.data_ptr() + t.nbytes <= base + (1 << 20)
        assert t.data_ptr() % 64 == 0
    pool.give(small)
    pool.give(big)
    assert pool.reserved_bytes == 1 << 20 and pool.bytes == (1 << 20) - 64  # the first slab (64 bytes) is still out
    outside = pool.take((1 << 20,), torch.float32, CPU)  # larger than the reserve: new memory, not kept
    assert not base <= outside.data_ptr() < base + (1 << 20)
    pool.give(outside)
    assert pool.bytes == (1 << 20) - 64
    other = pool.take(SHAPE, torch.float16, CPU)  # another dtype: new memory
    assert not base <= other.data_ptr() < base + (1 << 20)


def test_the_pool_keeps_at_most_its_budget_of_idle_chunks_oldest_going_first() -> None:
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


def test_idle_chunks_beyond_the_budget_go_whatever_their_place_among_the_chunks() -> None:
    """Chunks of new memory of different sizes, behind a reserve: dropping one finds it among the others by
    identity (comparing chunks field by field compared their buffers element by element, and failed)."""
    pool = SlabPool(64 << 10)
    pool.reserve(32 << 10, torch.float32, CPU)
    big, bigger = pool.take((20_000,), torch.float32, CPU), pool.take((30_000,), torch.float32, CPU)
    pool.give(big)
    pool.give(bigger)  # 200 KB of idle chunks against a 64 KiB budget: the older one goes, then the other
    assert pool.bytes == pool.reserved_bytes == 32 << 10
    assert pool.take((20_000,), torch.float32, CPU).data_ptr() not in (big.data_ptr(), bigger.data_ptr())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3000), st.integers(0, 50)), min_size=1, max_size=40))
def test_slabs_handed_out_never_overlap_and_come_zeroed(ops: list[tuple[bool, int, int]]) -> None:
    pool = SlabPool(16 << 10)
    pool.reserve(32 << 10, torch.float32, CPU)
    out: list[torch.Tensor] = []
    for take, n, which in ops:
        if take or not out:
            slab = pool.take((n,), torch.float32, CPU)
            assert torch.equal(slab, torch.zeros(n)) and slab.data_ptr() % 64 == 0
            lo, hi = span(slab)
            assert all(hi <= a or b <= lo for a, b in map(span, out)), "two live slabs share memory"
            slab.fill_(float(len(out) + 1))
            out.append(slab)
        else:
            pool.give(out.pop(which % len(out)))
        assert pool.bytes >= pool.reserved_bytes - sum(s.nbytes + 63 for s in out)
    for slab in out:  # no later take wrote into an earlier live slab
        assert slab.unique().numel() == 1
    for slab in out:
        pool.give(slab)
    assert pool.bytes <= pool.reserved_bytes + (16 << 10)


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
    assert seg.kv.data_ptr() == ptr
    assert torch.equal(seg.row_kv(0), kv[:, :, :, :90])


def test_a_batch_with_a_reserve_takes_every_slab_from_it() -> None:
    reserve = 8 << 20
    batch = DecodeBatch(2, 2, 8, torch.float32, CPU, max_rows=8, reserve_bytes=reserve)
    assert batch.pool.reserved_bytes == reserve and batch.allocated_bytes == reserve
    kv = torch.randn(2, 2, 2, 300, 8)
    reqs = [Request(str(i), list(range(i, 300)), SamplingParams(max_new_tokens=4)) for i in range(8)]
    for r in reqs:  # one by one: the segment grows (relayouts) as the batch fills up
        batch.concatenate([(r, kv[:, :, :, r.prompt_ids[0]:])])
    assert batch.allocated_bytes == reserve  # every slab inside the reserve
    for seg in batch.segments:
        for i, r in enumerate(seg.requests):
            assert torch.equal(seg.row_kv(i), kv[:, :, :, int(r.id):])
    batch.evict({r.id for r in reqs})
    assert batch.pool.bytes == reserve


def test_the_default_reserve_is_a_quarter_over_the_batch_kv_and_capped() -> None:
    assert default_reserve(1000, 4000) == 5_000_000
    smollm2 = 30 * 2 * 3 * 64 * 4  # bytes of one token's KV in float32
    assert default_reserve(32 * 2048, smollm2) == 32 * 2048 * smollm2 * 5 // 4  # 3.8 GB
    assert default_reserve(64 * 2048, smollm2) == 4 << 30  # the cap
