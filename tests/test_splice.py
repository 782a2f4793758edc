"""The engine's promise: whatever the arrival schedule, each request's greedy output equals `generate()` on that
request alone, token for token; seeded sampling does not depend on the batch."""

from __future__ import annotations

import functools
import itertools
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.engine import attention
from baton.engine import batch as batch_module
from baton.engine.engine import Engine
from baton.engine.models import LoadedModel
from baton.engine.request import Request, SamplingParams
from baton.engine.runner import ModelRunner, pack_for_prefill
from tests.conftest import make_tiny_gpt2, make_tiny_llama
from tests.support.oracle import reference

# A schedule: (prompt length, max_new_tokens, arrival iteration) per request.
schedules = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 10), st.integers(0, 12)), min_size=1, max_size=7
)



def run_schedule(engine: Engine, reqs: list[Request], arrivals: list[int]) -> None:
    """Drive the engine iteration by iteration; request i joins the queue at iteration arrivals[i]."""
    it = 0
    while it <= max(arrivals) or engine.has_work():
        for req, at in zip(reqs, arrivals):
            if at == it:
                req.arrival_time = 0.0
                engine.add_request(req)
        engine.step()
        it += 1
        assert it < 500, "engine did not finish"


def prompts_for(seed: int, lengths: list[int]) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(3, 2000, (n,), generator=g).tolist()) for n in lengths]


@functools.cache
def tiny_model(kind: str) -> LoadedModel:
    return make_tiny_llama() if kind == "llama" else make_tiny_gpt2()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("policy", ["baton", "baton-fused", "orca", "padded"])
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=schedules, max_batch=st.integers(1, 5), max_segments=st.integers(1, 3), seed=st.integers(0, 99)
)
def test_greedy_equals_generate_alone(
    kind: str, policy: str, schedule: list[tuple[int, int, int]], max_batch: int, max_segments: int, seed: int
) -> None:
    lm = tiny_model(kind)
    ref = functools.cache(functools.partial(reference, lm))
    engine = Engine(lm, policy=policy.removesuffix("-fused"), max_batch=max_batch, max_segments=max_segments,
                    segment_cost=4, fuse_prefill=policy.endswith("-fused"))
    prompts = prompts_for(seed, [s[0] for s in schedule])
    reqs = [
        Request(str(i), list(p), SamplingParams(max_new_tokens=s[1], ignore_eos=True))
        for i, (p, s) in enumerate(zip(prompts, schedule))
    ]
    run_schedule(engine, reqs, [s[2] for s in schedule])
    for req, p in zip(reqs, prompts):
        assert req.output_ids == ref(p, req.params.max_new_tokens), f"request {req.id} diverged"
    assert len(engine.batch) == 0
    if policy != "padded":  # no padding computed; padded pads the rows to a newcomer's prompt
        assert engine.stats.idle_rows == 0


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 10), st.integers(0, 12), st.booleans()),
                         min_size=1, max_size=7), max_batch=st.integers(1, 5), seed=st.integers(0, 99))
def test_fused_local_prompts_and_spliced_kv_share_a_batch(
    schedule: list[tuple[int, int, int, bool]], max_batch: int, seed: int
) -> None:
    """A decode worker under fuse_prefill: some newcomers come with KV prefilled elsewhere (spliced), the others
    are prefilled inside the batch's iteration; every output still equals generate() alone, and the fused
    iterations ran the local prompts with the rows' tokens in one pass (no pass of their own)."""
    lm = tiny_model("llama")
    ref = functools.cache(functools.partial(reference, lm))
    elsewhere = ModelRunner(lm)  # a prefill worker
    engine = Engine(lm, max_batch=max_batch, max_segments=2, segment_cost=4, fuse_prefill=True)
    prompts = prompts_for(seed, [s[0] for s in schedule])
    reqs = [Request(str(i), list(p), SamplingParams(max_new_tokens=s[1], ignore_eos=True))
            for i, (p, s) in enumerate(zip(prompts, schedule))]
    arrivals = [s[2] for s in schedule]
    it = 0
    while it <= max(arrivals) or engine.has_work():
        for req, (_, _, at, local) in zip(reqs, schedule):
            if at != it:
                continue
            req.arrival_time = 0.0
            if local:
                engine.add_request(req)
            else:
                engine.add_prefilled(req, elsewhere.prefill(req))
        engine.step()
        it += 1
        assert it < 500, "engine did not finish"
    for req, p in zip(reqs, prompts):
        assert req.output_ids == ref(p, req.params.max_new_tokens), f"request {req.id} diverged"
    assert engine.stats.prefill_s == 0.0 and engine.stats.idle_rows == 0  # no prefill pass of its own, no padding


def test_static_policy_equals_generate(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama, policy="static", max_batch=3)
    prompts = prompts_for(1, [5, 17, 9, 30])
    reqs = [
        Request(str(i), list(p), SamplingParams(max_new_tokens=3 + 2 * i, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    run_schedule(engine, reqs, [0, 0, 1, 2])
    for req, p in zip(reqs, prompts):
        assert req.output_ids == reference(tiny_llama, p, req.params.max_new_tokens)
    assert engine.stats.idle_rows > 0  # padded prefill and finished rows kept computing


SMOLLM2_PROMPTS = [
    "The capital of France is",
    "Write a haiku about autumn leaves.",
    "def fibonacci(n):",
    "Once upon a time, in a land far away, there lived a",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers:",
]


@given(lengths=st.lists(st.integers(1, 3000), max_size=12), budget=st.integers(1, 4096))
def test_packing_keeps_order_and_budget(lengths: list[int], budget: int) -> None:
    runs = pack_for_prefill(lengths, budget)
    assert [i for run in runs for i in run] == list(range(len(lengths)))
    for run in runs:
        assert len(run) == 1 or sum(lengths[i] for i in run) <= budget


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=6), budget=st.integers(1, 200), seed=st.integers(0, 99)
)
def test_packed_prefill_equals_each_prompt_alone(kind: str, lengths: list[int], budget: int, seed: int) -> None:
    """Packing prompts into one forward pass changes nothing a prompt sees: same KV, same first token."""
    runner = ModelRunner(tiny_model(kind))
    reqs = [Request(str(i), list(p), SamplingParams()) for i, p in enumerate(prompts_for(seed, lengths))]
    packed = runner.prefill_many(reqs, token_budget=budget)
    for req, got in zip(reqs, packed):
        alone = runner.prefill(req)
        assert got.request_id == req.id and got.prompt_ids == req.all_ids
        assert got.first_token == alone.first_token
        assert got.kv.shape == alone.kv.shape  # [layers, 2, kv_heads, prompt_len, head_dim]
        torch.testing.assert_close(got.kv, alone.kv, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def smollm2_cases(smollm2: LoadedModel) -> list[tuple[list[int], int, list[int]]]:
    """(prompt ids, max_new_tokens, generate() alone) for each prompt; computed once for both policies."""
    lm = smollm2
    tok = lm.tokenizer
    assert tok is not None
    cases = []
    for i, text in enumerate(SMOLLM2_PROMPTS):
        if i % 2:
            chat = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True
            )
            ids = list(chat["input_ids"])
        else:
            ids = list(tok(text)["input_ids"])
        max_new = 6 + 2 * i
        ref = lm.model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
        cases.append((ids, max_new, list(ref[0, len(ids) :].tolist())))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["baton", "orca", "padded"])
def test_smollm2_greedy_equals_generate(
    smollm2: LoadedModel, smollm2_cases: list[tuple[list[int], int, list[int]]], policy: str
) -> None:
    cases = smollm2_cases
    reqs = [Request(str(i), ids, SamplingParams(max_new_tokens=n)) for i, (ids, n, _) in enumerate(cases)]
    engine = Engine(smollm2, policy=policy, max_batch=3)
    run_schedule(engine, reqs, [0, 0, 2, 3, 3, 7])
    for req, (_, _, ref) in zip(reqs, cases):
        assert req.output_ids == ref, f"request {req.id} diverged"


@pytest.mark.parametrize("policy", ["baton", "orca", "padded", "static"])
def test_seeded_sampling_independent_of_batch(tiny_llama: LoadedModel, policy: str) -> None:
    params = SamplingParams(
        max_new_tokens=12, temperature=1.3, top_k=50, top_p=0.9, seed=1234, ignore_eos=True
    )
    prompt = list(prompts_for(7, [11])[0])

    alone = Engine(tiny_llama, policy=policy, max_batch=4)
    solo = Request("solo", prompt, params)
    run_schedule(alone, [solo], [0])

    crowd = Engine(tiny_llama, policy=policy, max_batch=4)
    others = [
        Request(f"o{i}", list(p), SamplingParams(max_new_tokens=8, temperature=0.8, seed=i))
        for i, p in enumerate(prompts_for(8, [30, 4, 19]))
    ]
    target = Request("target", prompt, params)
    run_schedule(crowd, [*others, target], [0, 0, 1, 2])
    assert target.output_ids == solo.output_ids
    assert len(set(solo.output_ids)) > 1  # really sampled


def test_unseeded_sampling_varies(tiny_llama: LoadedModel) -> None:
    outs = []
    for _ in range(2):
        engine = Engine(tiny_llama, max_batch=2)
        req = Request("r", [5, 6, 7], SamplingParams(max_new_tokens=16, temperature=1.5, ignore_eos=True))
        run_schedule(engine, [req], [0])
        outs.append(req.output_ids)
    assert outs[0] != outs[1]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("fused", [False, True])
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(st.tuples(st.integers(0, 1), st.integers(1, 30), st.integers(1, 8), st.integers(0, 10)),
                         min_size=2, max_size=7), prefix_lens=st.lists(st.integers(0, 150), min_size=2, max_size=2),
       max_segments=st.integers(1, 3), seed=st.integers(0, 99))
def test_rows_sharing_a_prefix_hold_it_once_and_equal_generate(
    kind: str, fused: bool, schedule: list[tuple[int, int, int, int]], prefix_lens: list[int], max_segments: int,
    seed: int,
) -> None:
    """Prompts of two families (each a common prefix, then a suffix of its own): rows of one family in a segment
    hold their common prefix once (segment.py's shared prefix, read once per step) and still equal generate().
    The saving a shared prefix must bring is lowered here so that short prompts exercise it (many examples put
    rows in a shared-prefix segment; test_a_shared_prefix_is_held_once shows the real threshold at work)."""
    with mock.patch.object(batch_module, "SHARED_MIN_SAVING", 64):
        run_families(kind, fused, schedule, prefix_lens, max_segments, seed)


def run_families(kind: str, fused: bool, schedule: list[tuple[int, int, int, int]], prefix_lens: list[int],
                 max_segments: int, seed: int) -> None:
    lm = tiny_model(kind)
    ref = functools.cache(functools.partial(reference, lm))
    engine = Engine(lm, max_batch=6, max_segments=max_segments, segment_cost=4, fuse_prefill=fused)
    prefixes = prompts_for(seed, prefix_lens)
    suffixes = prompts_for(seed + 1, [s[1] for s in schedule])
    prompts = [prefixes[f] + sfx for (f, *_), sfx in zip(schedule, suffixes)]
    reqs = [Request(str(i), list(p), SamplingParams(max_new_tokens=s[2], ignore_eos=True))
            for i, (p, s) in enumerate(zip(prompts, schedule))]
    run_schedule(engine, reqs, [s[3] for s in schedule])
    for req, p in zip(reqs, prompts):
        assert req.output_ids == ref(p, req.params.max_new_tokens), f"request {req.id} diverged"
    assert len(engine.batch) == 0 and engine.batch.kv_tokens == 0


def test_a_shared_prefix_is_held_once() -> None:
    lm = tiny_model("llama")
    engine = Engine(lm, max_batch=8)
    prefix = list(prompts_for(3, [600])[0])
    reqs = [Request(str(i), prefix + [5 + i] * (i + 1), SamplingParams(max_new_tokens=12, ignore_eos=True))
            for i in range(6)]
    for r in reqs:
        engine.add_request(r)
    engine.step()
    engine.step()
    segs = engine.batch.segments
    # 37 blocks of 16, held once for the 6 rows (from the 5th on, when 4 rows sharing it paid for it)
    assert [s.prefix_len for s in segs] == [592] and len(segs[0]) == 6
    assert engine.batch.kv_tokens == 592 + sum(segs[0].lens)
    engine.run_until_done()
    for r in reqs:
        assert r.output_ids == reference(lm, r.prompt_ids, 12)


def test_segments_of_rows_sharing_a_prefix_hold_one_copy() -> None:
    """Rows of very different lengths sit in segments of their own (chat's conversations over one system prompt):
    once enough rows share the prefix for reading it once to pay, every segment of theirs holds the same one
    tensor of it, and a segment made later takes that tensor at once; a row of another family keeps a segment
    without one. The KV is counted once, it outlives the rows that leave first, and outputs equal generate()."""
    lm = tiny_model("llama")
    engine = Engine(lm, max_batch=8, max_segments=8, segment_cost=4)
    prefix = list(prompts_for(5, [600])[0])
    suffixes = prompts_for(6, [150, 120, 90, 60, 30, 1])
    reqs = [Request(str(i), prefix + list(s), SamplingParams(max_new_tokens=4 + 3 * i, ignore_eos=True))
            for i, s in enumerate(suffixes)]
    stranger = Request("x", list(prompts_for(7, [640])[0]), SamplingParams(max_new_tokens=12, ignore_eos=True))
    for r in [*reqs[:4], stranger]:
        engine.add_request(r)
    engine.step()  # five rows, longest first: too few share the prefix for reading it once to pay
    assert [s.prefix_len for s in engine.batch.segments] == [0] * 5
    for r in reqs[4:]:
        engine.add_request(r)
    # the fifth row of the family: the four before it share 592 tokens (37 blocks) with it, 4 x 592 >= 2,048, and
    # take one copy between them; the sixth takes that copy, in a new segment of its own
    engine.step()
    segs = engine.batch.segments
    assert len(segs) == 7 and [len(s) for s in segs] == [1] * 7  # one row each
    assert sorted(s.prefix_len for s in segs) == [0] + [592] * 6  # the stranger's segment holds none
    assert len({id(s.prefix_kv) for s in segs if s.prefix_len}) == 1  # one copy, read once a step for six rows
    assert engine.batch.kv_tokens == 592 + sum(sum(s.lens) for s in segs)
    while len(engine.batch.requests) > 3:  # the first rows of the family finish and leave
        engine.step()
    assert engine.batch.kv_tokens == 592 + sum(sum(s.lens) for s in engine.batch.segments)
    engine.run_until_done()
    for r in [*reqs, stranger]:
        assert r.output_ids == reference(lm, r.prompt_ids, r.params.max_new_tokens)
    assert engine.batch.kv_tokens == 0


def test_the_cascade_merge_keeps_the_model_dtype() -> None:
    """The log-sum-exps are float32 whatever the model's dtype; the merged output must not be (bf16 on a GPU)."""
    g = torch.Generator().manual_seed(0)

    def bf16(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).bfloat16()

    q, k, v, prefix = bf16(2, 3, 3, 64), bf16(2, 3, 9, 64), bf16(2, 3, 9, 64), bf16(2, 3, 16, 64)
    own, lse = attention._attend(q, k, v, torch.zeros(2, 1, 1, 9, dtype=torch.bfloat16), 0.125)
    out = attention._cascade(q, own, lse, prefix, 0.125)  # [rows, 1, heads, head_dim]
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 9, 64)


@pytest.mark.parametrize("plain", [False, True])
def test_packed_spans_over_shared_pasts_equal_each_span_over_its_own_past(
        monkeypatch: pytest.MonkeyPatch, plain: bool) -> None:
    """attention._packed: spans after the same cached prefix attend over it in one call, merged with their own
    causal attention by log-sum-exps; spans with no past or another past alongside. Each span's output equals
    attention over [its past, its own tokens] with a causal mask, computed directly (GQA: 9 query heads over
    3 KV heads). plain: the branch a GPU runs (_attend_plain), checked here on the CPU."""
    if plain:
        monkeypatch.setattr(attention, "_attend", attention._attend_plain)
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, d, layer = 9, 3, 16, 1
    lens = [5, 1, 7, 3, 4]
    past_a, past_b = (torch.randn(2, 2, kv_heads, n, d, generator=g) for n in (32, 48))  # [layers, 2, kv, P, d]
    pasts: list[torch.Tensor | None] = [past_a, None, past_a, past_b, past_a]
    total = sum(lens)
    q = torch.randn(1, heads, total, d, generator=g)
    k, v = (torch.randn(1, kv_heads, total, d, generator=g) for _ in range(2))
    ends = list(itertools.accumulate(lens))
    spans = [(e - n, e) for e, n in zip(ends, lens)]
    module = torch.nn.Module()
    module.layer_idx = layer  # type: ignore[assignment]
    module.num_key_value_groups = heads // kv_heads  # type: ignore[assignment]
    module.training = False
    out = attention._packed(module, q, k, v, spans, 0.25, pasts)  # [1, total, heads, d]
    for (s, e), past in zip(spans, pasts):
        keys, values = k[:, :, s:e], v[:, :, s:e]
        if past is not None:
            keys, values = torch.cat([past[layer][0][None], keys], 2), torch.cat([past[layer][1][None], values], 2)
        keys, values = keys.repeat_interleave(3, 1), values.repeat_interleave(3, 1)
        n, m = e - s, keys.shape[2]
        mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
        want = torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], keys, values, attn_mask=mask,
                                                                scale=0.25)  # [1, heads, n, d]
        torch.testing.assert_close(out[:, s:e], want.transpose(1, 2), atol=1e-5, rtol=1e-4)
