"""The tables of docs/benchmarks.md "Peers" from the results scripts/bench_peers.sh writes (run with .venv)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from baton.bench.breakdown import table


def load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def p(d: dict[str, Any], key: str, scale: float = 1.0, digits: int = 1) -> str:
    v = d[key]
    return f"{v['p50'] * scale:.{digits}f} / {v['p99'] * scale:.{digits}f}"


def main(out: Path) -> None:
    vllm = {f.stem.removeprefix("mixed-"): load(f) for f in sorted(out.glob("mixed-vllm-t*.json"))}
    best_name, best = max(((k, v) for k, v in vllm.items() if v), key=lambda kv: kv[1]["output_tokens_per_s"])
    print(f"### mixed (vLLM's better setting: {best_name})\n")
    print("| system | output tok/s | vs vLLM | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | e2e p50 / p99 (s) |")
    print("| --- | ---: | ---: | --- | --- | --- |")
    for name in [*vllm, "baton", "baton-disaggregated", "baton-aten", "baton-flash", "baton-no-reserve"]:
        r = load(out / f"mixed-{name}.json")
        if r:
            ratio = r["output_tokens_per_s"] / best["output_tokens_per_s"]
            print(f"| {name} | {r['output_tokens_per_s']:.1f} | {ratio:.2f} | {p(r, 'ttft_s', digits=2)} | "
                  f"{p(r, 'tpot_s', 1000, 0)} | {p(r, 'e2e_s', digits=1)} |")
    print("\n### poisson at 70% of vLLM's capacity\n")
    print("| system | rate (req/s) | output tok/s | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | e2e p50 / p99 (s) |")
    print("| --- | ---: | ---: | --- | --- | --- |")
    for name in (best_name, "baton"):
        r = load(out / f"poisson-{name}.json")
        if r:
            print(f"| {name} | {r['rate']:g} | {r['output_tokens_per_s']:.1f} | {p(r, 'ttft_s', digits=2)} | "
                  f"{p(r, 'tpot_s', 1000, 0)} | {p(r, 'e2e_s', digits=1)} |")
    print("\n### offline, the mixed requests\n")
    print("| system | output tokens | seconds | output tok/s | vs vLLM |")
    print("| --- | ---: | ---: | ---: | ---: |")
    ref = load(out / "offline-vllm.json")
    for name in ("vllm", "baton", "baton-fused"):
        r = load(out / f"offline-{name}.json")
        if r and ref:
            print(f"| {r['system']} | {r['output_tokens']} | {r['seconds']:.1f} | {r['output_tokens_per_s']:.1f} | "
                  f"{r['output_tokens_per_s'] / ref['output_tokens_per_s']:.2f} |")
    for name in ("baton", "baton-disaggregated"):
        r = load(out / f"mixed-{name}.json")
        if r and "breakdown" in r:
            print(f"\n### where the time went: {name}, mixed\n")
            print(table(r["breakdown"]))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "results/peers"))
