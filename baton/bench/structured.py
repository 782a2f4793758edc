"""`baton bench structured`: what structured output costs a batch. The same full batch of B rows at context C is
stepped with every row free, and with `--constrained` of its rows held to a JSON schema (grammar.py: a mask per
row per step, and those rows sampled one by one); rounds alternate, and the medians' ratio is the mixed batch's
throughput as a share of the free one's.

The constrained rows' schema is an array of at least 64 integers, so no row can finish within the timed steps:
both batches do the same work but for the grammar.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baton.flags import add_model_arguments

if TYPE_CHECKING:
    from baton.engine.engine import Engine
    from baton.engine.models import LoadedModel

SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 64}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--constrained", type=int, default=16, help="rows of the mixed batch held to the schema")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=24, help="timed decode steps per measurement")
    p.add_argument("--rounds", type=int, default=3, help="alternate free/mixed this many times; medians reported")
    p.add_argument("--out", type=Path, help="write the results as JSON")


def _batch(lm: LoadedModel, batch: int, constrained: int, context: int) -> Engine:
    """A full baton batch (random KV: timing only); its first `constrained` rows under SCHEMA, their output so far
    the array's opening bracket."""
    from baton.bench.microbench import _full_batch, _generator
    from baton.engine.grammar import ResponseFormat

    engine = _full_batch(lm, batch, context, _generator(lm, 0))
    assert lm.tokenizer is not None, "structured output needs the model's tokenizer"
    bracket = list(lm.tokenizer.encode("[", add_special_tokens=False))
    fmt = ResponseFormat.json_schema(SCHEMA)
    for req in engine.batch.requests[:constrained]:
        req.params = dataclasses.replace(req.params, response_format=fmt, ignore_eos=False)
        req.output_ids[:] = bracket
        req.constrain(lm.grammars)
    return engine


def _median_step(engine: Engine, steps: int) -> float:
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        out = engine.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
        assert not out.finished, "a row finished inside the timed steps"
    return statistics.median(times)


def main(args: argparse.Namespace) -> int:
    import torch

    from baton.engine.models import load_model

    lm = load_model(args.model, args.device, args.dtype, args.cpu_gemm, args.cpu_attention)
    lm.grammars.tokenizer  # noqa: B018 - built once, before any timing (about a second)
    free_s, mixed_s = [], []
    with torch.inference_mode():
        for _ in range(args.rounds):  # interleaved, so machine noise hits both alike
            free_s.append(_median_step(_batch(lm, args.batch, 0, args.context), args.steps))
            mixed_s.append(_median_step(_batch(lm, args.batch, args.constrained, args.context), args.steps))
    f, m = statistics.median(free_s), statistics.median(mixed_s)
    result: dict[str, Any] = {
        "model": args.model, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
        "batch": args.batch, "constrained": args.constrained, "context": args.context, "schema": SCHEMA,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform()},
        "free_step_ms": 1e3 * f, "mixed_step_ms": 1e3 * m, "free_step_ms_rounds": [1e3 * x for x in free_s],
        "mixed_step_ms_rounds": [1e3 * x for x in mixed_s], "mixed_over_free_throughput": f / m,
    }
    print(f"batch {args.batch} at context {args.context}: free {1e3 * f:.1f} ms/step, with {args.constrained} rows "
          f"under a JSON schema {1e3 * m:.1f} ms/step -> {100 * f / m:.1f}% of the free batch's throughput")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0
