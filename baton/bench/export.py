"""`baton bench requests`: a named workload written as `baton run` input, one JSON object a line (`id`,
`input_ids`, `max_new_tokens`, `ignore_eos`, and `arrival_s` for a workload with arrivals), so that the engine
offline, and any other system's offline runner (scripts/vllm_offline.py), can be timed on the very requests that
`baton bench engine` and `baton bench serve` send.

    baton bench requests --workload mixed --out mixed.jsonl
    baton run --input mixed.jsonl --output out.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from baton.bench.serve_bench import load_tokenizer
from baton.bench.workloads import WORKLOADS, draw, get_workload
from baton.flags import env_default


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="mixed", choices=sorted(WORKLOADS), help="named workload (default mixed)")
    p.add_argument("--model", default=env_default("model", "smollm2-135m"),
                   help="the model whose tokenizer makes the prompts (default smollm2-135m)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn workload (default 0)")
    p.add_argument("--requests", type=int, help="number of requests (default: the workload's)")
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write ('-': stdout)")


def main(args: argparse.Namespace) -> int:
    spec = get_workload(args.workload, seed=args.seed, num_requests=args.requests)
    tokenizer, vocab = load_tokenizer(args.model)
    lines = []
    for r in draw(spec, tokenizer, vocab):
        obj: dict[str, object] = {"id": str(r.index), "input_ids": list(r.prompt_ids),
                                  "max_new_tokens": r.max_new_tokens, "ignore_eos": True}
        if spec.rate is not None:
            obj["arrival_s"] = round(r.arrival_s, 6)
        lines.append(json.dumps(obj))
    text = "\n".join(lines) + "\n"
    if str(args.out) == "-":
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
    return 0
