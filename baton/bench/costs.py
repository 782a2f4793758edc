"""`baton bench costs`: cost curves of the engine and the KV transfer, for the docs.

    baton bench costs --out results/costs.json && baton bench plot results/costs.json -o costs.png

- decode: one decode step of a baton batch (sampling included) against the batch size, at a fixed context;
- context: the same step against the context length, at a fixed batch size;
- splice: splicing one prompt's KV into a running batch (evicting a row first) against the batch size;
- kv: shipping one prompt's KV to a decode worker over gRPC (kv_ship.py) against the prompt length, with that
  prompt's prefill time.

Decode and splice use random KV (timing only); each point is a median over --steps steps or --repeats repeats.
`--parts` picks which curves to measure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baton.flags import add_model_arguments

if TYPE_CHECKING:
    from baton.engine.models import LoadedModel

PARTS = ("decode", "context", "splice", "kv")


def _ints(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"need integers >= 1: {text!r}")
    return out


def _parts(text: str) -> list[str]:
    out = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in out if x not in PARTS]
    if not out or bad:
        raise argparse.ArgumentTypeError(f"parts: choose from {','.join(PARTS)}, got {text!r}")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--parts", type=_parts, default=list(PARTS), help=f"what to measure (default {','.join(PARTS)})")
    p.add_argument("--batches", type=_ints, default=[1, 2, 4, 8, 16, 32],
                   help="batch sizes of the decode and splice curves")
    p.add_argument("--context", type=int, default=256, help="context length of the batch-size curves")
    p.add_argument("--contexts", type=_ints, default=[64, 128, 256, 512, 1024],
                   help="context lengths of the context curve")
    p.add_argument("--batch", type=int, default=8, help="batch size of the context curve")
    p.add_argument("--splice-prompt", type=int, default=256, help="prompt tokens of the spliced request")
    p.add_argument("--prompts", type=_ints, default=[32, 64, 128, 256, 512, 1024],
                   help="prompt lengths of the KV shipping curve")
    p.add_argument("--steps", type=int, default=12, help="timed decode steps per point")
    p.add_argument("--repeats", type=int, default=5, help="timed splices / prefills / KV pushes per point")
    p.add_argument("--out", type=Path, help="write the results as JSON")


def main(args: argparse.Namespace) -> int:
    from baton.engine.models import load_model

    lm = load_model(args.model, args.device, args.dtype, args.cpu_gemm, args.cpu_attention)
    needs = {"decode": args.context + args.steps + 2, "context": max(args.contexts) + args.steps + 2,
             "splice": args.context + args.splice_prompt + args.repeats + 2, "kv": max(args.prompts) + 2}
    longest = max(needs[part] for part in args.parts)
    if longest > lm.spec.max_context:
        print(f"baton bench costs: a point needs {longest} tokens of context, the model has {lm.spec.max_context}",
              file=sys.stderr)
        return 2
    result = measure(lm, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def measure(lm: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from baton.bench import kv_ship

    result: dict[str, Any] = {
        "kind": "costs",
        "model": args.model,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None},
        "kv_bytes_per_token": lm.kv_bytes_per_token(),
    }
    with torch.inference_mode():
        _measure_engine(lm, args, result)
    if "kv" in args.parts:  # outside inference mode, as in a decode worker
        points = asyncio.run(kv_ship.measure(lm, args.prompts, args.repeats))
        for pt in points:
            print(f"KV of a {pt['prompt_tokens']}-token prompt ({pt['kv_bytes'] / 2**20:.2f} MiB): shipped in "
                  f"{pt['ship_ms']:.1f} ms (serialize {pt['serialize_ms']:.1f}, push {pt['push_ms']:.1f}) vs "
                  f"prefill {pt['prefill_ms']:.1f} ms ({100 * pt['ship_over_prefill']:.0f}%)", flush=True)
        result["kv_shipping"] = {**kv_ship.describe(), "points": points}
    return result


def _measure_engine(lm: LoadedModel, args: argparse.Namespace, result: dict[str, Any]) -> None:
    from baton.bench.microbench import time_baton_steps, time_splice

    if "decode" in args.parts:
        points = []
        for b in args.batches:
            s = time_baton_steps(lm, b, args.context, args.steps)
            points.append({"batch": b, "step_ms": 1e3 * s, "tokens_per_s": b / s})
            print(f"decode step, batch {b}, context {args.context}: {1e3 * s:.1f} ms, {b / s:.1f} tok/s", flush=True)
        result["decode_vs_batch"] = {"context": args.context, "points": points}
    if "context" in args.parts:
        points = []
        for c in args.contexts:
            s = time_baton_steps(lm, args.batch, c, args.steps)
            points.append({"context": c, "step_ms": 1e3 * s, "tokens_per_s": args.batch / s})
            print(f"decode step, batch {args.batch}, context {c}: {1e3 * s:.1f} ms", flush=True)
        result["decode_vs_context"] = {"batch": args.batch, "points": points}
    if "splice" in args.parts:
        points = []
        for b in args.batches:
            sp = time_splice(lm, b, args.context, args.splice_prompt, args.repeats)
            points.append({"batch": b, **sp})
            print(f"splice of {args.splice_prompt} tokens into {b} rows at context {args.context}: "
                  f"{sp['splice_ms_mean']:.2f} ms mean, decode step {sp['step_ms_median']:.1f} ms", flush=True)
        result["splice_vs_batch"] = {"context": args.context, "prompt": args.splice_prompt, "points": points}
