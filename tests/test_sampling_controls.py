"""Per-row sampling controls and log-probabilities in the engine: logprobs of every output token and of the
prompt equal transformers' on the request alone, whatever shares the batch and whoever prefilled it; penalties,
logit_bias and min_tokens change one row's choice and nobody else's."""

from __future__ import annotations

import functools
import json
from dataclasses import replace

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.engine.engine import Engine
from baton.engine.grammar import Grammars, ResponseFormat
from baton.engine.logprobs import TokenLogprobs
from baton.engine.models import LoadedModel
from baton.engine.request import FinishReason, Request, SamplingParams
from baton.engine.runner import ModelRunner
from baton.engine.sampler import choice_seed
from baton.errors import InvalidRequestError
from tests.support.oracle import LOGPROB_TOLERANCE, reference, reference_logprobs
from tests.test_splice import prompts_for, tiny_model


def assert_logprobs(found: TokenLogprobs | None, dist: torch.Tensor, token: int, k: int) -> None:
    """One position's logprobs against transformers' distribution there ([vocab])."""
    assert found is not None and found.token == token
    assert abs(found.logprob - float(dist[token])) < LOGPROB_TOLERANCE
    assert len(found.top) == k
    best = dist.topk(k) if k else None
    for j, (tok, lp) in enumerate(found.top):
        assert best is not None and abs(lp - float(best.values[j])) < LOGPROB_TOLERANCE
        assert abs(float(dist[tok]) - lp) < LOGPROB_TOLERANCE  # ties may order equal values differently


def check_request(lm: LoadedModel, req: Request) -> None:
    """Every logprob the request asked for against transformers' on prompt + output alone."""
    dist = reference_logprobs(lm, req.prompt_ids + req.output_ids)  # [len, vocab]
    n = len(req.prompt_ids)
    k = req.params.logprobs
    if k is not None:
        assert len(req.logprobs) == len(req.output_ids)
        for i, (tok, found) in enumerate(zip(req.output_ids, req.logprobs)):
            assert_logprobs(found, dist[n - 1 + i], tok, k)
    if req.params.prompt_logprobs is not None:
        assert req.prompt_logprobs is not None and len(req.prompt_logprobs) == n
        assert req.prompt_logprobs[0] is None
        for i in range(1, n):
            assert_logprobs(req.prompt_logprobs[i], dist[i - 1], req.prompt_ids[i], req.params.prompt_logprobs)


@pytest.mark.parametrize("policy", ["baton", "baton-fused", "orca"])
@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 6), st.integers(0, 6),
                                   st.sampled_from([None, 0, 3]), st.sampled_from([None, 0, 2]), st.booleans()),
                         min_size=1, max_size=6),
       max_batch=st.integers(1, 4), seed=st.integers(0, 99))
def test_logprobs_equal_transformers_whatever_shares_the_batch(
    policy: str, schedule: list[tuple[int, int, int, int | None, int | None, bool]], max_batch: int, seed: int
) -> None:
    lm = tiny_model("llama")
    ref = functools.cache(functools.partial(reference, lm))
    fused = policy.endswith("-fused")
    engine = Engine(lm, policy=policy.removesuffix("-fused"), max_batch=max_batch, max_segments=2, segment_cost=4,
                    fuse_prefill=fused)
    elsewhere = ModelRunner(lm)  # a prefill worker, for the requests spliced under baton
    prompts = prompts_for(seed, [s[0] for s in schedule])
    reqs = [Request(str(i), list(p), SamplingParams(max_new_tokens=s[1], ignore_eos=True, logprobs=s[3],
                                                    prompt_logprobs=s[4]))
            for i, (p, s) in enumerate(zip(prompts, schedule))]
    it = 0
    while it <= max(s[2] for s in schedule) or engine.has_work():
        for req, s in zip(reqs, schedule):
            if s[2] == it:
                req.arrival_time = 0.0
                if s[5] and engine.policy.splices_prefilled_kv:
                    engine.add_prefilled(req, elsewhere.prefill(req))
                else:
                    engine.add_request(req)
        engine.step()
        it += 1
        assert it < 300
    for req, p in zip(reqs, prompts):
        assert req.output_ids == ref(p, req.params.max_new_tokens)
        check_request(lm, req)


def greedy_with(lm: LoadedModel, prompt: list[int], steps: int, adjust: object) -> list[int]:
    """A plain greedy loop over full forward passes, `adjust(logits [vocab], output so far)` applied each step."""
    out: list[int] = []
    for _ in range(steps):
        dist = reference_logprobs(lm, prompt + out)[-1]
        out.append(int(adjust(dist, out).argmax()))  # type: ignore[operator]
    return out


def run_alone(lm: LoadedModel, params: SamplingParams, prompt: list[int], others: int = 2) -> Request:
    """The request in a batch with `others` plain greedy requests that must not notice it."""
    engine = Engine(lm, max_batch=4)
    req = Request("r", prompt, params)
    plain = [Request(f"o{i}", prompt[i:] + [7], SamplingParams(max_new_tokens=6, ignore_eos=True))
             for i in range(others)]
    for r in [req, *plain]:
        r.arrival_time = 0.0
        engine.add_request(r)
    engine.run_until_done()
    for r in plain:
        assert r.output_ids == reference(lm, r.prompt_ids, 6)
    return req


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.7), (-2.0, -0.5)])
def test_presence_and_frequency_penalties_follow_openai(presence: float, frequency: float) -> None:
    lm = tiny_model("llama")
    prompt = prompts_for(3, [12])[0]

    def adjust(dist: torch.Tensor, out: list[int]) -> torch.Tensor:
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=dist.shape[0]).float() if out \
            else torch.zeros_like(dist)
        return dist - presence * (counts > 0).float() - frequency * counts

    params = SamplingParams(max_new_tokens=10, ignore_eos=True, presence_penalty=presence,
                            frequency_penalty=frequency)
    req = run_alone(lm, params, list(prompt))
    assert req.output_ids == greedy_with(lm, list(prompt), 10, adjust)
    if presence < 0:  # negative penalties reward repeats: the tiny model's greedy output never repeats itself
        assert req.output_ids != reference(lm, prompt, 10)


def test_logit_bias_forces_and_bans_tokens_per_row() -> None:
    lm = tiny_model("llama")
    prompt = list(prompts_for(4, [9])[0])
    forced = run_alone(lm, SamplingParams(max_new_tokens=4, ignore_eos=True, logit_bias=((42, 100.0),)), prompt)
    assert forced.output_ids == [42] * 4
    greedy = reference(lm, prompt, 4)
    banned = run_alone(lm, SamplingParams(max_new_tokens=4, ignore_eos=True, logit_bias=((greedy[0], -100.0),)),
                       prompt)
    assert banned.output_ids[0] != greedy[0]


def test_min_tokens_holds_back_stop_tokens() -> None:
    lm = tiny_model("llama")
    prompt = list(prompts_for(5, [8])[0])
    first = reference(lm, prompt, 1)[0]
    stops_at_once = run_alone(lm, SamplingParams(max_new_tokens=8, stop_token_ids=(first,)), prompt)
    assert stops_at_once.output_ids == [first]
    held = run_alone(lm, SamplingParams(max_new_tokens=8, stop_token_ids=(first,), min_tokens=3), prompt)
    assert len(held.output_ids) >= 3 and first not in held.output_ids[:2]


def test_logprobs_do_not_see_the_sampling_controls() -> None:
    """The raw distribution (logprobs.py): a biased token's logprob is the model's, not the biased one."""
    lm = tiny_model("llama")
    prompt = list(prompts_for(6, [10])[0])
    req = run_alone(lm, SamplingParams(max_new_tokens=3, ignore_eos=True, logprobs=2, logit_bias=((42, 100.0),)),
                    prompt)
    assert req.output_ids == [42, 42, 42]
    check_request(lm, req)


@pytest.mark.parametrize(("field", "value"), [
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("logit_bias", ((1, 101.0),)),
    ("logit_bias", ((1, 1.0), (1, 2.0))), ("min_tokens", 17), ("logprobs", 21), ("prompt_logprobs", -1),
])
def test_bad_controls_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(max_new_tokens=16, **{field: value})  # type: ignore[arg-type]
    assert e.value.field == field


def test_a_logit_bias_outside_the_vocabulary_is_refused() -> None:
    lm = tiny_model("llama")
    with pytest.raises(InvalidRequestError) as e:
        Engine(lm).add_request(Request("x", [5, 6], SamplingParams(logit_bias=((lm.spec.vocab_size, 1.0),))))
    assert e.value.field == "logit_bias"


# ---- structured output ----------------------------------------------------------------------------------------
SCHEMAS: list[dict[str, object]] = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"],
     "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}},
     "required": ["colour", "sure"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}}, "required": ["name"],
     "additionalProperties": False},
]


def json_format(schema: dict[str, object]) -> ResponseFormat:
    return ResponseFormat.json_schema(schema)


@pytest.mark.parametrize("how", ["local", "spliced", "orca"])
def test_constrained_and_free_rows_share_a_batch(how: str, tiny_llama: LoadedModel) -> None:
    """Each constrained row's output is JSON valid against its schema, ended (stop) as soon as the document is
    whole; the free rows beside it still equal generate() alone."""
    lm = tiny_llama
    engine = Engine(lm, policy="orca" if how == "orca" else "baton", max_batch=8)
    elsewhere = ModelRunner(lm)
    prompts = prompts_for(11, [6, 9, 4, 12, 7, 5, 8, 10])
    reqs = []
    for i, p in enumerate(prompts):
        fmt = json_format(SCHEMAS[i % len(SCHEMAS)]) if i % 2 == 0 else None
        temp = 0.8 if i % 4 == 2 else 0.0
        reqs.append(Request(str(i), list(p), SamplingParams(max_new_tokens=40, response_format=fmt, temperature=temp,
                                                            seed=i, ignore_eos=fmt is None)))
    for req in reqs:
        req.arrival_time = 0.0
        if how == "spliced":
            engine.validate(req)  # as a decode worker's reserve() does: the grammar's state for this worker
            other = Request(req.id, req.prompt_ids, req.params)
            other.constrain(elsewhere.lm.grammars)  # and the prefill worker's own
            engine.add_prefilled(req, elsewhere.prefill(other))
        else:
            engine.add_request(req)
    engine.run_until_done()
    for i, req in enumerate(reqs):
        if req.params.response_format is None:
            assert req.output_ids == reference(lm, req.prompt_ids, 40)
            continue
        text = lm.tokenizer.decode(req.output_ids, skip_special_tokens=True)  # type: ignore[union-attr]
        jsonschema.validate(json.loads(text), SCHEMAS[i % len(SCHEMAS)])
        assert req.finish_reason is FinishReason.STOP


def test_a_resumed_constrained_request_continues_its_document(tiny_llama: LoadedModel) -> None:
    lm = tiny_llama
    schema = SCHEMAS[2]
    whole = Request("a", [5, 6, 7], SamplingParams(max_new_tokens=40, response_format=json_format(schema)))
    engine = Engine(lm)
    engine.add_request(whole)
    engine.run_until_done()
    half = len(whole.output_ids) // 2
    again = Request("b", [5, 6, 7], whole.params, output_ids=whole.output_ids[:half])
    engine.add_request(again)
    engine.run_until_done()
    assert again.output_ids == whole.output_ids


@pytest.mark.parametrize("schema", [{"type": "wat"}, {"type": "string", "format": "not-a-format", "pattern": "(("}])
def test_a_schema_that_cannot_be_enforced_is_refused(schema: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError) as e:
        ResponseFormat.json_schema(schema)
    assert e.value.field == "response_format"


# ---- several choices from one prefill ---------------------------------------------------------------------
@pytest.mark.parametrize("prompt_len", [1, 2, 9])
def test_choices_forked_from_one_prefill_equal_requests_alone(prompt_len: int) -> None:
    """n choices spliced from ONE prefill: choice i samples exactly as a request of its own seeded
    choice_seed(seed, i) would alone, whatever else shares the batch; logprobs stay transformers'."""
    lm = tiny_model("llama")
    prompt = list(prompts_for(21, [prompt_len])[0])
    params = SamplingParams(max_new_tokens=6, temperature=0.9, seed=77, ignore_eos=True, logprobs=1)
    engine = Engine(lm, max_batch=6)
    other = Request("other", list(prompts_for(22, [5])[0]), SamplingParams(max_new_tokens=9, ignore_eos=True))
    engine.add_request(other)
    engine.step()
    choices = [Request("c" if i == 0 else f"c/{i}", prompt, replace(params, seed=choice_seed(77, i)))
               for i in range(4)]
    payload = ModelRunner(lm).prefill(choices[0])
    engine.add_prefilled(choices[0], payload, forks=choices[1:])
    engine.run_until_done()
    assert other.output_ids == reference(lm, other.prompt_ids, 9)
    for i, c in enumerate(choices):
        alone = Engine(lm)
        solo = Request("solo", prompt, replace(params, seed=choice_seed(77, i)))
        alone.add_request(solo)
        alone.run_until_done()
        assert c.output_ids == solo.output_ids, f"choice {i}"
        check_request(lm, c)
    assert len({tuple(c.output_ids) for c in choices}) > 1  # they sampled on streams of their own


def test_a_tokenizer_the_grammar_library_cannot_read_refuses_formats_not_requests() -> None:
    """A model whose tokenizer llguidance cannot read (a bare word-level one) still serves; a request with a
    response_format is refused naming the field, the same every time (the failure is kept, not retried)."""
    from baton.bench.shapes import word_tokenizer

    lm = tiny_model("llama")
    grammars = Grammars(word_tokenizer(lm.spec.vocab_size), lm.spec.vocab_size)
    req = Request("x", [5, 6], SamplingParams(response_format=json_format(SCHEMAS[0])))
    for _ in range(2):
        with pytest.raises(InvalidRequestError) as e:
            req.constrain(grammars)
        assert e.value.field == "response_format" and "tokenizer" in str(e.value)
    Request("y", [5, 6]).constrain(grammars)  # nothing asked: nothing needed
