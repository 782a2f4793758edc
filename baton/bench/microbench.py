"""`baton bench decode`: the cost of BATON's machinery against this machine's ceiling.

- steady decode: a 32-row baton batch at context C against a bare loop that decodes a dense, unpadded 32-row
  batch of the same context with transformers' own DynamicCache (no mask, no splice, no bookkeeping);
- splice: inserting one P-token request into a full batch at context C (evict a row, splice a newcomer,
  decode a step; repeated), against the decode step time there.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baton.flags import add_model_arguments

if TYPE_CHECKING:  # torch is imported only when a benchmark runs
    from baton.engine.models import LoadedModel


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=512, help="context length of steady decode")
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per measurement")
    p.add_argument("--splice-context", type=int, default=1024)
    p.add_argument("--splice-prompt", type=int, default=512)
    p.add_argument("--splice-repeats", type=int, default=8)
    p.add_argument(
        "--rounds", type=int, default=3, help="alternate baton/bare this many times; medians reported"
    )
    p.add_argument("--out", type=Path, help="write the results as JSON")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _generator(lm: LoadedModel, seed: int) -> Any:
    """A seeded generator on the model's device: random KV is made there (on the CPU, a large batch's KV would
    take longer to draw than the benchmark to run)."""
    import torch

    return torch.Generator(device=lm.device).manual_seed(seed)


def _random_kv(lm: LoadedModel, tokens: int, gen: Any) -> Any:
    import torch

    shape = (lm.spec.num_layers, 2, lm.spec.kv_heads, tokens, lm.spec.head_dim)
    return torch.randn(shape, generator=gen, dtype=torch.float32, device=lm.device).to(lm.dtype)


def _full_batch(lm: LoadedModel, batch: int, context: int, gen: Any) -> Any:
    """A baton engine whose batch holds `batch` rows of `context` tokens (random KV: timing only)."""
    from baton.engine.engine import Engine
    from baton.engine.request import Request, RequestStatus, SamplingParams

    engine = Engine(lm, policy="baton", max_batch=batch)
    items = []
    for i in range(batch):
        # distinct prompts: rows sharing a prefix would hold it once (segment.py), which is not what this measures
        req = Request(f"r{i}", [5 + i] * context, SamplingParams(max_new_tokens=10**6, ignore_eos=True))
        req.output_ids.append(7)
        req.status = RequestStatus.RUNNING
        items.append((req, _random_kv(lm, context, gen)))
    engine.batch.concatenate(items)
    return engine


def time_baton_steps(lm: LoadedModel, batch: int, context: int, steps: int) -> float:
    """Median seconds per decode step of a baton batch (sampling included)."""
    engine = _full_batch(lm, batch, context, _generator(lm, 0))
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        engine.step()
        _sync(lm.device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_bare_steps(lm: LoadedModel, batch: int, context: int, steps: int) -> float:
    """Median seconds per step of the bare dense loop: model forward + argmax, DynamicCache, no mask."""
    import torch
    from transformers import DynamicCache

    gen = _generator(lm, 0)
    shape = (batch, lm.spec.kv_heads, context, lm.spec.head_dim)
    layers = [
        tuple(torch.randn(shape, generator=gen, device=lm.device).to(lm.dtype) for _ in range(2))
        for _ in range(lm.spec.num_layers)
    ]
    cache = DynamicCache(ddp_cache_data=layers, config=lm.config)
    ids = torch.full((batch, 1), 7, dtype=torch.long, device=lm.device)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        pos = torch.full((batch, 1), context + i, dtype=torch.long, device=lm.device)
        out = lm.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        ids = out.logits[:, -1].argmax(-1, keepdim=True)
        ids.tolist()
        _sync(lm.device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_splice(lm: LoadedModel, batch: int, context: int, prompt: int, repeats: int) -> dict[str, float]:
    """Evict a row, splice a `prompt`-token newcomer, decode one step; `repeats` times."""
    from baton.engine.request import Request, RequestStatus, SamplingParams

    gen = _generator(lm, 1)
    engine = _full_batch(lm, batch, context, gen)
    engine.step()
    splice, step = [], []
    for i in range(repeats):
        victim = engine.batch.requests[i % batch]
        engine.batch.evict({victim.id})
        req = Request(f"new{i}", [4] * prompt, SamplingParams(max_new_tokens=10**6, ignore_eos=True))
        req.output_ids.append(7)
        req.status = RequestStatus.RUNNING
        kv = _random_kv(lm, prompt, gen)
        t0 = time.perf_counter()
        engine.batch.concatenate([(req, kv)])
        _sync(lm.device)
        splice.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.step()
        _sync(lm.device)
        step.append(time.perf_counter() - t0)
    return {
        "splice_ms_mean": 1e3 * statistics.mean(splice),
        "splice_ms_max": 1e3 * max(splice),
        "step_ms_median": 1e3 * statistics.median(step),
        "splice_over_step": statistics.mean(splice) / statistics.median(step),
    }


def main(args: argparse.Namespace) -> int:
    import torch

    with torch.inference_mode():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    import torch

    from baton.engine.models import load_model

    lm = load_model(args.model, args.device, args.dtype, args.cpu_gemm, args.cpu_attention)
    baton_s, bare_s = [], []
    for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
        baton_s.append(time_baton_steps(lm, args.batch, args.context, args.steps))
        bare_s.append(time_bare_steps(lm, args.batch, args.context, args.steps))
    b, r = statistics.median(baton_s), statistics.median(bare_s)
    splice = time_splice(lm, args.batch, args.splice_context, args.splice_prompt, args.splice_repeats)
    result = {
        "model": args.model,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "batch": args.batch,
        "context": args.context,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "baton_step_ms": 1e3 * b,
        "bare_step_ms": 1e3 * r,
        "baton_tokens_per_s": args.batch / b,
        "bare_tokens_per_s": args.batch / r,
        "baton_over_bare_throughput": r / b,
        "splice": {"context": args.splice_context, "prompt": args.splice_prompt, **splice},
    }
    print(
        f"steady decode, batch {args.batch}, context {args.context}: baton {1e3 * b:.1f} ms/step, "
        f"bare loop {1e3 * r:.1f} ms/step -> baton at {100 * r / b:.1f}% of the bare loop's throughput"
    )
    print(
        f"splice of a {args.splice_prompt}-token request into {args.batch} rows at context "
        f"{args.splice_context}: {splice['splice_ms_mean']:.2f} ms mean vs a {splice['step_ms_median']:.1f} ms "
        f"decode step ({100 * splice['splice_over_step']:.1f}%)"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
