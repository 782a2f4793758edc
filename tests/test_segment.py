"""Property tests of the splice machinery without a model: whatever sequence of splices, steps and evictions,
every row's valid columns hold exactly its own tokens, in order, and the window bookkeeping stays consistent."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from baton.engine.batch import DecodeBatch
from baton.engine.request import Request, SamplingParams
from baton.engine.segment import RowKV

LAYERS, HEADS, DIM = 2, 2, 3


def token_kv(token_ids: list[float]) -> torch.Tensor:
    """KV whose every element for token t equals t: [layers, 2, heads, tokens, dim]."""
    t = torch.tensor(token_ids, dtype=torch.float32)
    return t.view(1, 1, 1, -1, 1).expand(LAYERS, 2, HEADS, len(token_ids), DIM).clone()


def check(batch: DecodeBatch, expected: dict[str, list[float]]) -> None:
    assert len(batch) == len(expected)
    for seg in batch.segments:
        assert len(seg) > 0
        assert len(seg.requests) == len(seg.lens)
        for r, req in enumerate(seg.requests):
            cols = seg.valid[r].nonzero().squeeze(1)
            assert seg.lens[r] == cols.numel() == len(expected[req.id])
            assert not seg.valid[r, : seg.lo].any() and not seg.valid[r, seg.hi :].any()
            got = seg.kv[:, :, r, :, cols, :]  # [layers, 2, heads, tokens, dim]
            assert torch.equal(got, token_kv(expected[req.id])), f"row {req.id} holds the wrong KV"
        # leading all-padding columns are dropped
        assert seg.valid[: len(seg), seg.lo].any()
        # padding inside the window is finite (attention weighs it by zero; zero times NaN would still be NaN)
        assert torch.isfinite(seg.kv[:, :, : len(seg), :, seg.lo : seg.hi]).all()


ops = st.lists(
    st.one_of(
        st.tuples(st.just("splice"), st.integers(1, 70)),
        st.tuples(st.just("step"), st.integers(1, 3)),
        st.tuples(st.just("evict"), st.integers(0, 100)),
        st.tuples(st.just("compact"), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(ops=ops, max_rows=st.integers(1, 9), max_segments=st.integers(1, 4), segment_cost=st.integers(0, 40))
def test_rows_keep_their_own_kv(
    ops: list[tuple[str, int]], max_rows: int, max_segments: int, segment_cost: int
) -> None:
    batch = DecodeBatch(
        LAYERS,
        HEADS,
        DIM,
        torch.float32,
        torch.device("cpu"),
        max_rows=max_rows,
        max_segments=max_segments,
        segment_cost=segment_cost,
    )
    expected: dict[str, list[float]] = {}
    counter = 0.0
    for op, arg in ops:
        if op == "splice" and batch.free_rows:
            counter += 1
            rid = f"r{counter:g}"
            toks = [counter * 1000 + i for i in range(arg)]
            # distinct prompts: rows sharing a prefix hold it once (tests/test_splice.py covers that); every other
            # row comes in two parts (a cached prefix's KV and the rest: RowKV), copied into the slab apart
            kv: torch.Tensor | RowKV = token_kv(toks)
            if counter % 2 == 0 and arg >= 2:
                kv = RowKV((token_kv(toks[: arg // 2]), token_kv(toks[arg // 2 :])))
            batch.concatenate([(Request(rid, [int(counter)] * arg, SamplingParams()), kv)])
            expected[rid] = toks
        elif op == "step" and len(batch):
            for _ in range(arg):  # write what attention would write: each row's next token
                for seg in batch.segments:
                    seg.begin_step()
                    nxt = [expected[r.id][-1] + 0.5 for r in seg.requests]
                    for layer in range(LAYERS):
                        k = torch.tensor(nxt).view(-1, 1, 1, 1).expand(len(seg), HEADS, 1, DIM)
                        kw, vw, mask = seg.attend_inputs(layer, k, k)
                        assert kw.shape[2] == mask.shape[-1] == seg.width + 1
                    seg.end_step()
                    for r, v in zip(seg.requests, nxt):
                        expected[r.id].append(v)
        elif op == "evict" and len(batch):
            victim = batch.requests[arg % len(batch)].id
            batch.evict({victim})
            del expected[victim]
        elif op == "compact":
            batch.compact(0.0)
        check(batch, expected)


def test_row_kv_parts_give_views_of_the_tokens_asked() -> None:
    past, rest = token_kv([1.0, 2.0, 3.0]), token_kv([4.0, 5.0])
    kv = RowKV((past, rest))
    assert kv.tokens == 5 and RowKV.of(past).parts == (past,) and RowKV.of(kv) is kv
    assert [torch.equal(p, token_kv(t)) for p, t in zip(kv.after(2), [[3.0], [4.0, 5.0]])] == [True, True]
    assert len(kv.after(3)) == 1 and torch.equal(kv.after(4)[0], token_kv([5.0]))
    assert kv.first(2).data_ptr() == past.data_ptr()  # a view of the cached part: nothing copied
    assert torch.equal(kv.first(4), token_kv([1.0, 2.0, 3.0, 4.0]))


def test_a_splice_of_several_rows_grows_the_slab_once() -> None:
    batch = DecodeBatch(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), max_rows=8, max_segments=1)
    batch.concatenate([(Request(f"r{i}", [i] * 10, SamplingParams()), token_kv([float(i)] * 10)) for i in range(6)])
    seg = batch.segments[0]
    one_row = 10 * LAYERS * 2 * HEADS * DIM * 4
    assert seg.rows_cap >= 6 and seg.copied_bytes == one_row  # sized for all six when the second came: one move
    check(batch, {f"r{i}": [float(i)] * 10 for i in range(6)})


def test_splice_writes_only_the_newcomer() -> None:
    """The common case copies only the newcomer's KV: no re-layout of the rows already there."""
    batch = DecodeBatch(LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), max_rows=4, max_segments=1)
    batch.concatenate([(Request("a", [1] * 50, SamplingParams()), token_kv([1.0] * 50))])
    batch.concatenate([(Request("c", [1] * 5, SamplingParams()), token_kv([3.0] * 5))])  # grows the slab's rows
    batch.evict({"c"})
    seg = batch.segments[0]
    slab, copied = seg.kv, seg.copied_bytes
    batch.concatenate([(Request("b", [1] * 20, SamplingParams()), token_kv([2.0] * 20))])
    assert seg.kv is slab and seg.copied_bytes == copied
    assert seg.width == 50 and seg.padding == 30


def test_segments_separate_long_and_short_rows() -> None:
    batch = DecodeBatch(
        LAYERS, HEADS, DIM, torch.float32, torch.device("cpu"), max_rows=8, max_segments=4, segment_cost=16
    )
    for i, n in enumerate([300, 290, 40, 35]):
        batch.concatenate([(Request(str(i), [1] * n, SamplingParams()), token_kv([float(i)] * n))])
    assert [len(s) for s in batch.segments] == [2, 2]
    assert batch.padding == 10 + 5
