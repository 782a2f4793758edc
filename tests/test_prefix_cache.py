"""The prefix cache (baton/engine/prefix_cache.py): a prompt prefilled over a cached prefix gives the same KV and
first token as prefilled whole, whatever was cached, evicted or packed beside it; the cache keeps whole prefixes
within its byte budget."""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import PreTrainedTokenizerBase

import baton.engine.engine as engine_module
import baton.engine.segment as segment_module
from baton.engine.engine import Engine
from baton.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from baton.engine.request import FinishReason, Request, SamplingParams
from baton.engine.runner import ModelRunner
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from tests.support.inproc import Options, running_stack
from tests.support.oracle import reference
from tests.test_splice import tiny_model


def block_bytes() -> int:
    s = tiny_model("llama").spec
    return s.num_layers * 2 * s.kv_heads * BLOCK_TOKENS * s.head_dim * 4


def check_invariants(cache: PrefixCache) -> None:
    blocks = cache._blocks
    assert cache.bytes <= cache.max_bytes
    joined = cache._joined
    assert cache.bytes == sum(b.nbytes for b in blocks.values()) + (joined[1].nbytes if joined else 0)
    assert joined is None or joined[0] in blocks, "the chain joined last is still cached (evictions drop it first)"
    for key, b in blocks.items():
        assert b.parent is None or b.parent in blocks, "a cached block's prefix is cached"
        assert b.children == sum(1 for c in blocks.values() if c.parent == key)


# a family: shared prefixes (one per family), each prompt = a prefix + a suffix of its own
families = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 20)), min_size=1, max_size=10)


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(prompts=families, prefix_lens=st.lists(st.integers(0, 70), min_size=4, max_size=4),
       budget_blocks=st.sampled_from([0, 1, 3, 8, 1000]), batch=st.integers(1, 3), seed=st.integers(0, 50))
def test_prefills_over_cached_prefixes_equal_whole_prefills(
    prompts: list[tuple[int, int]], prefix_lens: list[int], budget_blocks: int, batch: int, seed: int
) -> None:
    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(seed)
    prefixes = [torch.randint(3, 2000, (n,), generator=g).tolist() for n in prefix_lens]
    reqs = [Request(str(i), prefixes[f] + torch.randint(3, 2000, (k,), generator=g).tolist(),
                    SamplingParams(max_new_tokens=3, ignore_eos=True))
            for i, (f, k) in enumerate(prompts)]
    cache = PrefixCache(budget_blocks * block_bytes())
    cached, whole = ModelRunner(lm, cache), ModelRunner(lm)
    for a in range(0, len(reqs), batch):  # prefilled a few at a time, packed together
        got = cached.prefill_many(reqs[a : a + batch])
        want = whole.prefill_many(reqs[a : a + batch])
        for g_, w in zip(got, want):
            assert g_.first_token == w.first_token and g_.prompt_ids == w.prompt_ids
            torch.testing.assert_close(g_.kv, w.kv, atol=2e-5, rtol=1e-4)
        check_invariants(cache)


def test_a_spliced_request_prefilled_over_a_cached_prefix_decodes_as_generate() -> None:
    lm = tiny_model("llama")
    ref = functools.cache(functools.partial(reference, lm))
    runner = ModelRunner(lm, PrefixCache(10**8))
    system = list(range(100, 150))  # 50 shared tokens: 3 whole blocks
    engine = Engine(lm, max_batch=4)
    reqs = [Request(f"t{i}", system + [7 + i] * (3 + i), SamplingParams(max_new_tokens=5, ignore_eos=True))
            for i in range(4)]
    for req in reqs:
        engine.add_prefilled(req, runner.prefill(req))
    engine.run_until_done()
    for req in reqs:
        assert req.output_ids == ref(tuple(req.prompt_ids), 5)
    assert runner.prefix_cache is not None and runner.prefix_cache.stats.hit_tokens == 3 * 48


def test_eviction_takes_the_least_recently_used_tails_first() -> None:
    lm = tiny_model("llama")
    cache = PrefixCache(4 * block_bytes())
    runner = ModelRunner(lm, cache)
    a = list(range(10, 10 + 3 * BLOCK_TOKENS + 1))  # 3 blocks and a token
    b = list(range(500, 500 + 2 * BLOCK_TOKENS + 1))  # 2 blocks and a token
    runner.prefill(Request("a", a))
    assert len(cache) == 3
    runner.prefill(Request("b", b))  # needs 2 blocks: a's tail goes, then the block before it
    assert len(cache) == 4 and cache.stats.evicted_blocks == 1
    check_invariants(cache)
    assert cache.lookup(a + [1])[0] == 2 * BLOCK_TOKENS  # a's first two blocks are left
    assert cache.lookup(b + [1])[0] == 2 * BLOCK_TOKENS
    assert PrefixCache(0).lookup(a) == (0, None)


def test_a_chain_looked_up_again_is_joined_once_and_kept_while_older_blocks_go() -> None:
    """The prompts after one long system prompt all find the same chain: the second lookup returns the tensor the
    first one joined, not a new copy; its bytes count in the budget. In a full cache it is as recently used as the
    chain's last lookup: older blocks are evicted to keep it (a full cache once dropped it at every insert, and
    every prompt after the system prompt joined its own copy again), and it goes with the chain's last block; a
    chain that with its copy would take more than half the budget is not kept joined."""
    cache = PrefixCache(10 * block_bytes())
    s = tiny_model("llama").spec

    def kv(blocks: int) -> torch.Tensor:
        return torch.randn(s.num_layers, 2, s.kv_heads, blocks * BLOCK_TOKENS, s.head_dim)

    old = list(range(900, 900 + 5 * BLOCK_TOKENS))
    cache.insert(old, kv(5))  # the oldest blocks
    system, system_kv = list(range(100, 100 + 2 * BLOCK_TOKENS)), kv(2)
    cache.insert(system, system_kv)
    n, first = cache.lookup(system + [1, 2])
    n2, again = cache.lookup(system + [3])
    assert n == n2 == 2 * BLOCK_TOKENS and first is not None and first is again and torch.equal(first, system_kv)
    assert cache.bytes == 9 * block_bytes()  # seven blocks and the chain's joined copy
    check_invariants(cache)
    cache.insert(list(range(700, 700 + 2 * BLOCK_TOKENS)), kv(2))  # room: the oldest tail goes, not the copy
    assert cache.stats.evicted_blocks == 1 and cache.lookup(system + [4])[1] is first
    check_invariants(cache)
    for i in range(5):  # newer prompts: the chain ages; its joined copy goes, then its blocks
        cache.insert(list(range(2000 + 100 * i, 2000 + 100 * i + 2 * BLOCK_TOKENS)), kv(2))
        check_invariants(cache)
    assert cache._joined is None and not cache.holds(system, 2 * BLOCK_TOKENS)
    big = list(range(3000, 3000 + 3 * BLOCK_TOKENS))
    cache.insert(big, kv(3))
    _, one = cache.lookup(big + [1])
    _, two = cache.lookup(big + [2])
    assert one is not two and cache._joined is None, "3 blocks and their copy: more than half the budget"
    check_invariants(cache)


def test_an_insert_from_a_block_boundary_keeps_blocks_only_after_cached_ones() -> None:
    """A finished row whose first blocks are a shared prefix the cache holds gives only its own tokens' KV."""
    s = tiny_model("llama").spec
    kv = torch.randn(s.num_layers, 2, s.kv_heads, 3 * BLOCK_TOKENS, s.head_dim)
    ids = list(range(10, 10 + 3 * BLOCK_TOKENS))
    cache = PrefixCache(10**8)
    cache.insert(ids, kv[:, :, :, BLOCK_TOKENS:], start=BLOCK_TOKENS)  # block 0 not cached: nothing can be kept
    assert len(cache) == 0
    cache.insert(ids[:BLOCK_TOKENS], kv[:, :, :, :BLOCK_TOKENS])
    cache.insert(ids, kv[:, :, :, BLOCK_TOKENS:], start=BLOCK_TOKENS)
    assert len(cache) == 3 and torch.equal(cache.lookup(ids + [1])[1], kv)  # type: ignore[arg-type]
    check_invariants(cache)


def test_a_fused_iteration_counts_only_uncached_tokens_against_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts after one cached prefix, each longer than the packed pass's token budget but with few new tokens:
    all of them run in one iteration (their cached parts are not computed, so they do not count), exactly."""
    monkeypatch.setattr(engine_module, "PREFILL_TOKEN_BUDGET", 40)
    lm = tiny_model("llama")
    system = list(range(100, 100 + 3 * BLOCK_TOKENS))
    cache = PrefixCache(10**8)
    engine = Engine(lm, max_batch=8, fuse_prefill=True, prefix_cache=cache)
    first = Request("first", system + [5], SamplingParams(max_new_tokens=2, ignore_eos=True))
    engine.add_request(first)
    engine.run_until_done()  # the system prompt is cached now
    reqs = [Request(f"r{i}", system + [7 + i] * 6, SamplingParams(max_new_tokens=4, ignore_eos=True))
            for i in range(5)]  # 54 tokens each, 6 to compute: 30 in all
    for req in reqs:
        engine.add_request(req)
    engine.step()
    assert len(engine.batch) == 5 and not engine.waiting
    engine.run_until_done()
    for req in reqs:
        assert req.output_ids == reference(lm, req.prompt_ids, 4)


def test_prompts_arriving_together_compute_their_shared_uncached_prefix_once() -> None:
    """In-batch prefix sharing (ModelRunner.compute_once): of prompts that start with the same uncached blocks,
    one computes them and the others wait a round (prefill_many) or an iteration (a fused engine) and find them
    cached; a prompt sharing less than SHARED_UNCACHED_BLOCKS blocks, or none, is not held back. Exact."""
    lm = tiny_model("llama")
    system = list(range(100, 100 + 3 * BLOCK_TOKENS))

    def prompts(tag: str) -> list[Request]:
        same = [Request(f"{tag}{i}", system + [7 + i] * 5, SamplingParams(max_new_tokens=3, ignore_eos=True))
                for i in range(4)]
        short = Request(f"{tag}short", system[:BLOCK_TOKENS] + [9] * 40, SamplingParams(max_new_tokens=3,
                                                                                        ignore_eos=True))
        other = Request(f"{tag}other", list(range(900, 960)), SamplingParams(max_new_tokens=3, ignore_eos=True))
        return [same[0], short, same[1], other, same[2], same[3]]

    runner = ModelRunner(lm, PrefixCache(10**8))
    reqs = prompts("p")
    split = runner.compute_once(reqs)
    assert (split.now, split.later) == ([0, 1, 3], [2, 4, 5])
    assert split.uncached == [len(reqs[i].prompt_ids) for i in split.now]  # nothing cached yet
    # a prompt that asks for its prompt's logprobs computes them all whatever is cached: it never waits
    logprobs = Request("lp", reqs[2].prompt_ids, SamplingParams(max_new_tokens=3, prompt_logprobs=1))
    assert runner.compute_once([reqs[0], logprobs]).later == []
    # a cache whose half cannot keep the 2 blocks a waiting prompt must find: waiting would gain nothing
    assert ModelRunner(lm, PrefixCache(3 * block_bytes())).compute_once(reqs).later == []
    assert ModelRunner(lm, PrefixCache(4 * block_bytes())).compute_once(reqs).later == [2, 4, 5]
    got = runner.prefill_many(reqs)
    want = ModelRunner(lm).prefill_many(reqs)
    for g_, w in zip(got, want):
        assert g_.first_token == w.first_token
        torch.testing.assert_close(g_.kv, w.kv, atol=2e-5, rtol=1e-4)
    assert runner.prefix_cache is not None and runner.prefix_cache.stats.hit_tokens == 3 * len(system)

    engine = Engine(lm, max_batch=8, fuse_prefill=True, prefix_cache=PrefixCache(10**8))
    reqs = prompts("e")
    for req in reqs:
        engine.add_request(req)
    engine.step()
    assert sorted(r.id for r in engine.batch.requests) == ["e0", "eother", "eshort"]
    assert sorted(r.id for r in engine.waiting) == ["e1", "e2", "e3"]
    engine.step()
    assert not engine.waiting and len(engine.batch) == 6
    assert engine.runner.prefix_cache is not None
    assert engine.runner.prefix_cache.stats.hit_tokens == 3 * len(system)
    engine.run_until_done()
    for req in reqs:
        assert req.output_ids == reference(lm, req.prompt_ids, 3)


@pytest.mark.parametrize("full", [False, True])
def test_a_splice_of_prompts_after_one_cached_prefix_holds_it_once_from_its_first_row(
        monkeypatch: pytest.MonkeyPatch, full: bool) -> None:
    """Many prompts after one cached system prompt, run in one fused iteration: they find one tensor of it, even
    in a cache filled to its budget by earlier prompts (full); their rows hold it as one shared prefix from the
    first row spliced on (the rows still to come in the same splice count towards what sharing saves), so no slab
    is ever made as wide as the whole prompt; and the prompts' attention over the cached prefix, all of them in
    one call per layer (attention._packed), decodes exactly as generate()."""
    widest = [0]
    relayout = segment_module.KVSegment._relayout

    def recording(self: segment_module.KVSegment, *args: Any, **kwargs: Any) -> None:
        relayout(self, *args, **kwargs)
        widest[0] = max(widest[0], self.cols_cap)

    monkeypatch.setattr(segment_module.KVSegment, "_relayout", recording)
    pasts: list[list[torch.Tensor | None]] = []
    iterate = engine_module.iterate

    def watching(*args: Any, **kwargs: Any) -> Any:
        it = iterate(*args, **kwargs)
        pasts.append(it.pasts)
        return it

    monkeypatch.setattr(engine_module, "iterate", watching)
    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(5)
    system = torch.randint(3, 2000, (24 * BLOCK_TOKENS,), generator=g).tolist()  # 384 tokens
    cache = PrefixCache(100 * block_bytes() if full else 10**8)
    if full:  # earlier prompts, 112 blocks' worth: the cache evicts from here on
        for _ in range(7):
            cache.insert(torch.randint(3, 2000, (16 * BLOCK_TOKENS,), generator=g).tolist(),
                         torch.randn(lm.spec.num_layers, 2, lm.spec.kv_heads, 16 * BLOCK_TOKENS, lm.spec.head_dim))
        assert cache.bytes > 90 * block_bytes()
    engine = Engine(lm, max_batch=8, fuse_prefill=True, prefix_cache=cache)
    engine.add_request(Request("first", system + [5], SamplingParams(max_new_tokens=1, ignore_eos=True)))
    engine.run_until_done()  # the system prompt is cached now; the batch is empty
    reqs = [Request(f"r{i}", system + torch.randint(3, 2000, (3 + 2 * i,), generator=g).tolist(),
                    SamplingParams(max_new_tokens=3 + i % 3, ignore_eos=True)) for i in range(8)]
    for req in reqs:
        engine.add_request(req)
    engine.step()  # all eight in one pass, over the cached prefix
    assert len(engine.batch) == 8 and not engine.waiting
    assert len({id(p) for p in pasts[-1]}) == 1 and pasts[-1][0] is not None, "one tensor of the prefix"
    assert [len(ids) for ids, _ in engine.batch.shared_prefixes()] == [len(system)]
    assert widest[0] < len(system), "no slab as wide as the prompts"
    engine.run_until_done()
    for req in reqs:
        assert req.output_ids == reference(lm, req.prompt_ids, req.params.max_new_tokens), req.id


@pytest.mark.parametrize("fused", [False, True])
def test_rows_holding_a_shared_prefix_leave_their_history_to_the_cache_exactly(fused: bool) -> None:
    """Conversations over one long system prompt, held once by the batch as a shared prefix: each finished row
    gives the cache its own tokens only (the prefix is cached already), and every next turn, started from
    that history, equals generate() on its whole prompt alone."""
    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    system = torch.randint(3, 2000, (24 * BLOCK_TOKENS,), generator=g).tolist()  # 384 x 8 rows: pays
    cache = PrefixCache(10**8)
    engine = Engine(lm, max_batch=8, fuse_prefill=fused, prefix_cache=cache)
    history = [system + torch.randint(3, 2000, (5 + c,), generator=g).tolist() for c in range(8)]
    shared = False
    for turn in range(2):
        reqs = [Request(f"c{c}t{turn}", h, SamplingParams(max_new_tokens=4 + c % 3, ignore_eos=True))
                for c, h in enumerate(history)]
        for req in reqs:
            engine.add_request(req)
        while engine.has_work():
            engine.step()
            shared = shared or any(len(ids) >= len(system) for ids, _ in engine.batch.shared_prefixes())
        for c, req in enumerate(reqs):
            assert req.output_ids == reference(lm, req.prompt_ids, req.params.max_new_tokens), req.id
            done = req.prompt_ids + req.output_ids[:-1]  # the KV its row held
            assert cache.holds(done, len(done) // BLOCK_TOKENS * BLOCK_TOKENS)
            history[c] = req.prompt_ids + req.output_ids + torch.randint(3, 2000, (3,), generator=g).tolist()
    assert shared, "the rows held the system prompt as one shared prefix"
    check_invariants(cache)


@pytest.mark.parametrize("fused", [False, True])
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(convs=st.lists(st.tuples(st.integers(1, 40), st.lists(st.tuples(st.integers(1, 12), st.integers(1, 8)),
                                                             min_size=1, max_size=4)), min_size=1, max_size=4),
       budget_blocks=st.sampled_from([2, 6, 1000]), cancel=st.integers(0, 5), seed=st.integers(0, 50))
def test_conversations_reuse_their_history_exactly(
    fused: bool, convs: list[tuple[int, list[tuple[int, int]]]], budget_blocks: int, cancel: int, seed: int
) -> None:
    """Multi-turn conversations on one engine with a prefix cache: each turn's prompt is the conversation so far
    (earlier prompts and answers) plus a new user turn, so it starts with KV a finished row left in the cache;
    every answer equals generate() on the whole prompt alone, whatever was evicted or cancelled in between."""
    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(seed)
    cache = PrefixCache(budget_blocks * block_bytes())
    engine = Engine(lm, max_batch=3, max_segments=2, segment_cost=4, fuse_prefill=fused, prefix_cache=cache)
    history = [torch.randint(3, 2000, (n,), generator=g).tolist() for n, _ in convs]
    turns = [list(t) for _, t in convs]
    step = 0
    while any(turns):
        live = []
        for c, ts in enumerate(turns):  # the next turn of every conversation, together in the batch
            if ts:
                user, answer = ts.pop(0)
                prompt = history[c] + torch.randint(3, 2000, (user,), generator=g).tolist()
                req = Request(f"c{c}t{step}", prompt, SamplingParams(max_new_tokens=answer, ignore_eos=True))
                engine.add_request(req)
                live.append((c, req))
        if cancel == step:  # one request cancelled mid-way: its row is not kept
            engine.step()
            engine.cancel(live[0][1].id)
        engine.run_until_done()
        for c, req in live:
            if req.finish_reason is FinishReason.CANCELLED:
                history[c] = req.prompt_ids  # the conversation goes on without that answer
                continue
            assert req.output_ids == reference(lm, req.prompt_ids, req.params.max_new_tokens), req.id
            history[c] = req.prompt_ids + req.output_ids
        check_invariants(cache)
        step += 1


@pytest.mark.parametrize("fused", [False, True])
def test_a_second_turn_computes_only_what_is_new(fused: bool) -> None:
    lm = tiny_model("llama")
    cache = PrefixCache(10**8)
    engine = Engine(lm, fuse_prefill=fused, prefix_cache=cache)
    first = Request("t1", list(range(200, 240)), SamplingParams(max_new_tokens=10, ignore_eos=True))
    engine.add_request(first)
    engine.run_until_done()
    assert cache.stats.hit_tokens == 0
    history = first.prompt_ids + first.output_ids  # 50 tokens: the row kept the KV of 49 (3 whole blocks)
    second = Request("t2", history + [5, 6, 7], SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.add_request(second)
    engine.run_until_done()
    assert second.output_ids == reference(lm, second.prompt_ids, 6)
    assert cache.stats.hit_tokens == 3 * BLOCK_TOKENS  # only 5 of its 53 prompt tokens were computed


def test_a_next_turn_pushed_through_the_router_ships_only_what_the_decode_worker_lacks(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    """Through the router, a prefill worker and gRPC: a conversation's next turn is pushed less the blocks the
    decode worker's cache holds (the router saw them in its reports), and equals generate(); when those blocks are
    evicted between the router's look and the push, the push is refused, the whole KV goes, and the answer is
    still exact."""
    budget = 3 * block_bytes()  # three blocks: the third turn's history fills it
    with running_stack(tokenizer, Options(prefix_cache_bytes=budget)) as s:
        lm, cache = s.decode.lm, s.decode.engine.runner.prefix_cache
        assert cache is not None
        metrics = s.decode.metrics
        per_token = block_bytes() // BLOCK_TOKENS

        def turn(stub: baton_pb2_grpc.RouterStub, ids: list[int], n: int) -> list[int]:
            out = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), parameters=pb.SamplingParameters(
                max_new_tokens=n, ignore_eos=True)), timeout=60)
            assert list(out.token_ids) == reference(lm, ids, n)
            time.sleep(0.3)  # the decode worker's next report tells the router what its cache now holds
            return ids + list(out.token_ids)

        with grpc.insecure_channel(s.grpc) as ch:
            stub = baton_pb2_grpc.RouterStub(ch)
            history = turn(stub, list(range(100, 140)), 6)  # 46 tokens: the decode worker keeps 2 blocks
            received = metrics.kv_received._value.get()
            history = turn(stub, history + [7, 8, 9], 5)  # 49 tokens, 32 held: 17 pushed
            assert metrics.kv_held_bytes._value.get() == 2 * BLOCK_TOKENS * per_token
            assert metrics.kv_received._value.get() - received == 17 * per_token

            s.prefill_gate.clear()  # the third turn's prefill waits while its held blocks are evicted
            third = history + [1, 2]  # 56 tokens, 48 held as the router sees it
            result: list[list[int]] = []
            thread = threading.Thread(target=lambda: result.append(turn(stub, third, 4)))
            thread.start()
            deadline = time.monotonic() + 20
            while s.loop.call(s.decode.occupancy).waiting == 0:
                assert time.monotonic() < deadline, "the third turn reserved no row"
                time.sleep(0.02)
            other = torch.randn(lm.spec.num_layers, 2, lm.spec.kv_heads, 3 * BLOCK_TOKENS, lm.spec.head_dim)
            cache.insert(list(range(1000, 1048)), other)  # evicts all three blocks of the history
            assert not cache.holds(third, BLOCK_TOKENS)
            s.prefill_gate.set()
            thread.join(60)
            assert result, "the third turn failed"
            assert metrics.kv_held_evicted._value.get() == 1
            assert metrics.kv_held_bytes._value.get() == 2 * BLOCK_TOKENS * per_token  # nothing more held
        s.wait_idle()
