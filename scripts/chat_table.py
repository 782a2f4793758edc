"""The table of scripts/bench_chat.sh: each workload with the prefix caches on and off, from its results."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def row(r: dict[str, Any]) -> str:
    b = r.get("breakdown", {})

    def c(name: str) -> float:
        return float(b.get(name, {}).get("value", 0.0))

    received = r["prompt_tokens"]
    hits = c("baton_prefill_prefix_hit_tokens_total") + c("baton_decode_prefix_hit_tokens_total")
    computed = received - hits
    kv = c("baton_decode_kv_received_bytes_total") / max(1, r["requests_completed"])
    return (f"| {r['workload']} | {r['policy']} | {r['requests_completed']} | {r['output_tokens_per_s']:.1f} | "
            f"{r['ttft_s']['p50']:.2f} | {r['tpot_s']['p50'] * 1000:.0f} | {received} | {int(computed)} "
            f"({100 * computed / max(1, received):.0f}%) | {kv / 1e6:.2f} |")


def main() -> None:
    out = Path(sys.argv[1])
    print("| workload | system | requests | output tok/s | TTFT p50 (s) | TPOT p50 (ms) | prompt tokens received "
          "| computed | KV MB shipped per request |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for workload in ("chat", "shared-prefix"):
        for run in ("cache", "nocache"):
            path = out / f"{workload}-baton-{run}.json"
            if path.exists():
                print(row(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
