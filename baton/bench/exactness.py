"""Token-exactness on any device: each request's greedy output from the engine, on a staggered schedule that makes
the batch splice newcomers and evict finished rows, against transformers' `generate()` on that request alone.

The test suite checks the same promise on the CPU (tests/test_splice.py); this runs it wherever the model is (a
GPU's kernels are not the CPU's) and reports, instead of asserting, each request's outcome: exact or not, and where
it first diverged.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from baton.engine.models import LoadedModel


@dataclass(frozen=True)
class Case:
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival: int  # the engine iteration at which it joins the queue


def staggered_cases(vocab_size: int, n: int, prompt_max: int, new_max: int, seed: int = 0) -> list[Case]:
    """`n` requests of random tokens, prompts of 1..prompt_max tokens asking for 1..new_max, joining at
    iterations 0..2n (two at the first, so the batch starts with company)."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        prompt = tuple(rng.randrange(3, vocab_size) for _ in range(rng.randint(1, prompt_max)))
        cases.append(Case(prompt, rng.randint(1, new_max), 0 if i < 2 else rng.randint(1, 2 * n)))
    return cases


def reference(lm: LoadedModel, prompt: Sequence[int], max_new: int, ignore_eos: bool = True) -> list[int]:
    """Greedy tokens from transformers' own generate() on the prompt alone, on the model's device: exactly
    max_new of them with `ignore_eos`, else up to and including the end-of-sequence token. The one reference
    every exactness check uses (the tests' too: tests/support/oracle.py)."""
    generate: Any = lm.model.generate  # typed as a Tensor attribute by torch's Module stubs
    extra = {"min_new_tokens": max_new} if ignore_eos else {}
    ids = torch.tensor([list(prompt)], device=lm.device)
    out = generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=0, **extra)
    return [int(t) for t in out[0, len(prompt):].tolist()]


def engine_outputs(lm: LoadedModel, policy: str, cases: list[Case], max_batch: int) -> list[list[int]]:
    """Drive an engine iteration by iteration, each case joining at its iteration; every case's output."""
    from baton.engine.engine import Engine
    from baton.engine.request import Request, SamplingParams

    engine = Engine(lm, policy=policy, max_batch=max_batch, segment_cost=4)
    reqs = [Request(str(i), list(c.prompt), SamplingParams(max_new_tokens=c.max_new_tokens, ignore_eos=True))
            for i, c in enumerate(cases)]
    it = 0
    while it <= max(c.arrival for c in cases) or engine.has_work():
        for req, c in zip(reqs, cases):
            if c.arrival == it:
                req.arrival_time = 0.0
                engine.add_request(req)
        engine.step()
        it += 1
        if it > 10_000:
            raise RuntimeError(f"{policy}: the engine did not finish")
    return [list(r.output_ids) for r in reqs]


def check(lm: LoadedModel, cases: list[Case], policies: tuple[str, ...] = ("baton", "orca", "padded"),
          max_batch: int = 3) -> dict[str, Any]:
    """Every policy's outputs against generate() alone: per policy, per request, exact or where it diverged."""
    expected = [reference(lm, c.prompt, c.max_new_tokens) for c in cases]
    result: dict[str, Any] = {"model": lm.name, "device": str(lm.device),
                              "dtype": str(lm.dtype).removeprefix("torch."), "max_batch": max_batch,
                              "requests": len(cases), "policies": {}}
    for policy in policies:
        rows = []
        for i, (c, want, got) in enumerate(zip(cases, expected, engine_outputs(lm, policy, cases, max_batch))):
            row: dict[str, Any] = {"index": i, "prompt_len": len(c.prompt), "max_new_tokens": c.max_new_tokens,
                                   "arrival_iteration": c.arrival, "exact": got == want}
            if got != want:
                row["first_mismatch"] = next((k for k, (a, b) in enumerate(zip(want, got)) if a != b),
                                             min(len(want), len(got)))
                row["expected"], row["got"] = want, got
            rows.append(row)
        result["policies"][policy] = {"exact": all(r["exact"] for r in rows), "requests": rows}
    result["exact"] = all(p["exact"] for p in result["policies"].values())
    return result
