"""Selective batching (the `orca` policy, baton/engine/selective.py): newcomers' prompts and the running rows'
tokens in ONE forward pass, no padding, each part equal to what its own pass (prefill, decode step) computes."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from baton.engine.engine import Engine
from baton.engine.models import LoadedModel
from baton.engine.request import Request, SamplingParams
from baton.engine.runner import ModelRunner
from baton.engine.selective import iterate
from tests.conftest import make_tiny_gpt2, make_tiny_llama


def prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 2000, (n,), generator=g).tolist() for n in lengths]


def params(n: int = 20) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def running_batch(runner: ModelRunner, reqs: list[Request]) -> Any:
    """A batch holding `reqs` prefilled, each with its first token as its last output (ready to decode)."""
    batch = runner.new_batch(8, max_segments=2, segment_cost=4)
    for req, payload in zip(reqs, runner.prefill_many(reqs)):
        req.output_ids.append(payload.first_token)
        batch.concatenate([(req, payload.kv)])
    return batch


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2], ids=["llama", "gpt2"])
def test_one_pass_equals_its_prefills_and_decode_step(make: Any) -> None:
    lm: LoadedModel = make()
    runner = ModelRunner(lm)
    lengths = [5, 23, 9]
    a = running_batch(runner, [Request(f"r{i}", p, params()) for i, p in enumerate(prompts(1, lengths))])
    b = running_batch(runner, [Request(f"r{i}", p, params()) for i, p in enumerate(prompts(1, lengths))])
    newcomers = [Request(f"n{i}", p, params()) for i, p in enumerate(prompts(2, [7, 1, 30]))]

    step = runner.decode(a)  # the rows' step alone
    it = iterate(runner, b, newcomers)  # the same step, with the newcomers' prompts in the same pass

    assert it.rows is not None and it.prompt_tokens == 38
    torch.testing.assert_close(it.rows.logits, step.logits, rtol=1e-4, atol=1e-5)
    assert it.rows.logits.argmax(-1).tolist() == step.logits.argmax(-1).tolist()
    assert (it.rows.useful_kv, it.rows.attended_kv, it.rows.inputs.idle_rows) == (
        step.useful_kv, step.attended_kv, 0)
    for sa, sb in zip(a.segments, b.segments):  # every row gained its one token, as after a decode step
        assert (sa.lens, sa.lo, sa.hi) == (sb.lens, sb.lo, sb.hi)
        torch.testing.assert_close(sb.kv[:, :, : len(sb), :, sb.lo : sb.hi], sa.kv[:, :, : len(sa), :, sa.lo : sa.hi],
                                   rtol=1e-4, atol=1e-5)
    for req, got in zip(newcomers, it.payloads):  # each prompt as if prefilled alone
        alone = runner.prefill(req)
        assert got.request_id == req.id and got.first_token == alone.first_token
        assert got.kv.shape == alone.kv.shape  # [layers, 2, kv_heads, prompt_len, head_dim]
        torch.testing.assert_close(got.kv, alone.kv, rtol=1e-4, atol=1e-5)


def test_newcomers_and_running_rows_share_one_forward(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama, policy="orca", max_batch=4)
    running = Request("running", prompts(3, [12])[0], params())
    engine.add_request(running)
    engine.step()
    engine.step()
    assert [r.id for r in engine.batch.requests] == ["running"] and len(running.output_ids) == 2
    newcomers = [Request(f"n{i}", p, params()) for i, p in enumerate(prompts(4, [6, 17]))]
    once = Request("once", prompts(5, [4])[0], params(1))  # finishes on its first token: never joins
    for r in (*newcomers, once):
        engine.add_request(r)

    calls: list[tuple[int, ...]] = []
    handle = tiny_llama.model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        out = engine.step()
    finally:
        handle.remove()

    assert calls == [(1, 6 + 17 + 4 + 1)]  # one pass: three prompts and the running row's token, no padding
    assert sorted(r.id for r, _ in out.tokens) == ["n0", "n1", "once", "running"]
    assert [r.id for r in out.finished] == ["once"]
    assert sorted(r.id for r in engine.batch.requests) == ["n0", "n1", "running"]
    assert engine.stats.idle_rows == 0
    engine.step()
    assert [len(r.output_ids) for r in newcomers] == [2, 2] and len(running.output_ids) == 4


def test_a_full_batch_admits_no_one(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama, policy="orca", max_batch=1)
    first, second = (Request(i, p, params(3)) for i, p in zip("ab", prompts(6, [5, 8])))
    engine.add_request(first)
    engine.add_request(second)
    engine.step()
    assert [r.id for r in engine.batch.requests] == ["a"] and [r.id for r in engine.waiting] == ["b"]
    while engine.has_work():
        engine.step()
    assert len(first.output_ids) == len(second.output_ids) == 3
