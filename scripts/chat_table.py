"""The table of scripts/bench_chat.sh: every run it made (results/chat/<workload>-<label>.json), workload by
workload. Prompt tokens computed and KV shipped come from Baton's own metrics (--metrics), so a peer's are blank."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def row(r: dict[str, Any]) -> str:
    b = r.get("breakdown")

    def c(name: str) -> float:
        return float((b or {}).get(name, {}).get("value", 0.0))

    received = r["prompt_tokens"]
    done = max(1, r["requests_completed"])
    computed = kv = held = "-"
    if b:
        hits = c("baton_prefill_prefix_hit_tokens_total") + c("baton_decode_prefix_hit_tokens_total")
        computed = f"{int(received - hits)} ({100 * (received - hits) / max(1, received):.0f}%)"
        kv = f"{c('baton_decode_kv_received_bytes_total') / done / 1e6:.2f}"
        held = f"{c('baton_decode_kv_held_bytes_total') / done / 1e6:.2f}"
    return (f"| {r['workload']} | {r['policy']} | {r['requests_completed']} | {r['output_tokens_per_s']:.1f} | "
            f"{r['ttft_s']['p50']:.2f} | {r['tpot_s']['p50'] * 1000:.0f} | {received} | {computed} | {kv} | "
            f"{held} |")


def main() -> None:
    out = Path(sys.argv[1])
    print("| workload | system | requests | output tok/s | TTFT p50 (s) | TPOT p50 (ms) | prompt tokens received "
          "| computed | KV MB shipped per request | KV MB not shipped (held) per request |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for workload in ("chat", "shared-prefix"):
        for path in sorted(out.glob(f"{workload}-*.json")):
            r = json.loads(path.read_text())
            if r.get("workload") == workload:
                print(row(r))


if __name__ == "__main__":
    main()
