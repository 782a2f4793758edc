"""`baton bench plot FILE... -o plot.png`: charts of benchmark result files.

Files from `baton bench engine` and `baton bench serve` (or any benchmark whose JSON objects share their keys:
`policy`, `workload`, `output_tokens_per_s`, `ttft_s`, `tpot_s` or `itl_s`, `e2e_s`, and `rate` for Poisson runs).
A file may hold one object or a list of them.

- Runs at two or more arrival rates (Poisson workloads): throughput and latency percentiles (p50, p90, p99)
  against the rate, one line per policy; runs with every request at t=0 (rate null) are left out of these.
- Otherwise: bars of throughput, and of TTFT / TPOT / end-to-end latency at p50, p90 and p99, per run.
- Service runs (`baton bench serve`, which have `itl_s`) show the inter-token latency in place of TPOT.
- Files from `baton bench costs`: its cost curves (plot_costs.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

LATENCIES = (("ttft_s", "TTFT", 1.0, "s"), ("tpot_s", "time per output token", 1000.0, "ms"),
             ("e2e_s", "end-to-end latency", 1.0, "s"))
ITL = ("itl_s", "inter-token latency", 1000.0, "ms")
QUANTILES = ("p50", "p90", "p99")
LINE_STYLES = {"p50": ("o", "-"), "p90": ("s", ":"), "p99": ("x", "--")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="+", type=Path, help="result JSON files")
    p.add_argument("-o", "--output", type=Path, default=Path("bench.png"),
                   help="image file (default: bench.png)")
    p.add_argument("--title", help="figure title")


def main(args: argparse.Namespace) -> int:
    try:
        runs = load(args.files)
    except (OSError, ValueError) as e:
        print(f"baton bench plot: {e}", file=sys.stderr)
        return 2
    if not runs:
        print("baton bench plot: no results in the given files", file=sys.stderr)
        return 2
    from baton.bench.plot_costs import is_costs, plot_costs

    costs = [is_costs(r) for r in runs]
    if any(costs) and not all(costs):
        print("baton bench plot: cost curves (bench costs) and throughput results cannot share a chart",
              file=sys.stderr)
        return 2
    if all(costs):
        plot_costs(runs, args.output, title=args.title)
    else:
        plot(runs, args.output, title=args.title)
    print(f"wrote {args.output}")
    return 0


def load(files: list[Path]) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for path in files:
        data = json.loads(Path(path).read_text())
        items = data if isinstance(data, list) else [data]
        for item in items:
            if not isinstance(item, dict) or ("output_tokens_per_s" not in item and item.get("kind") != "costs"):
                raise ValueError(f"{path}: not a benchmark result (no output_tokens_per_s)")
            runs.append(item)
    return runs


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def _rate(run: dict[str, Any]) -> float | None:
    rate = run.get("rate")
    if rate is None:
        rate = (run.get("workload_params") or {}).get("rate")
    return float(rate) if isinstance(rate, (int, float)) else None


def labels(runs: list[dict[str, Any]]) -> list[str]:
    """One distinct label per run: its policy (or `label`), with the workload when the runs mix workloads."""
    mixed_workloads = len({r.get("workload") for r in runs}) > 1
    out: list[str] = []
    seen: dict[str, int] = defaultdict(int)
    for r in runs:
        name = str(r.get("label") or r.get("policy") or "?")
        if mixed_workloads:
            name += f" ({r.get('workload')})"
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def plot(runs: list[dict[str, Any]], output: Path, title: str | None = None) -> str:
    """Write the chart; returns which kind it drew ("rate" or "bars")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_rate = [r for r in runs if _rate(r) is not None]
    by_rate = len({_rate(r) for r in with_rate}) >= 2
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    kind = "rate" if by_rate else "bars"
    if by_rate:
        _plot_vs_rate(with_rate, axes, latencies(with_rate))
    else:
        _plot_bars(runs, axes, latencies(runs))
    first = runs[0]
    fig.suptitle(title or _default_title(runs, first))
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return kind


def latencies(runs: list[dict[str, Any]]) -> tuple[tuple[str, str, float, str], ...]:
    """TTFT, then ITL when every run has it (service runs) or else TPOT, then end-to-end latency."""
    if all(isinstance(r.get(ITL[0]), dict) for r in runs):
        return (LATENCIES[0], ITL, LATENCIES[2])
    return LATENCIES


def _default_title(runs: list[dict[str, Any]], first: dict[str, Any]) -> str:
    workloads = sorted({str(r.get("workload")) for r in runs})
    parts = [f"workload {', '.join(workloads)}"]
    for key, fmt in (("num_requests", "{} requests"), ("max_batch", "max batch {}"), ("model", "{}"),
                     ("device", "on {}")):
        if first.get(key) is not None:
            parts.append(fmt.format(first[key]))
    return ", ".join(parts)


def _plot_bars(runs: list[dict[str, Any]], axes: Any, lats: tuple[tuple[str, str, float, str], ...]) -> None:
    names = labels(runs)
    x = list(range(len(runs)))
    ax = axes[0][0]
    ax.bar(x, [_num(r.get("output_tokens_per_s")) for r in runs], color="tab:blue")
    ax.set_title("throughput")
    ax.set_ylabel("output tokens/s")
    ax.set_xticks(x, names, rotation=20, ha="right")
    for ax, (key, name, scale, unit) in zip((axes[0][1], axes[1][0], axes[1][1]), lats, strict=True):
        width = 0.8 / len(QUANTILES)
        for k, q in enumerate(QUANTILES):
            vals = [_num((r.get(key) or {}).get(q)) * scale for r in runs]
            ax.bar([i + (k - 1) * width for i in x], vals, width, label=q)
        ax.set_title(name)
        ax.set_ylabel(unit)
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.legend()


def _plot_vs_rate(runs: list[dict[str, Any]], axes: Any, lats: tuple[tuple[str, str, float, str], ...]) -> None:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[str(r.get("label") or r.get("policy") or "?")].append(r)
    for name, group in groups.items():
        group.sort(key=lambda r: _rate(r) or 0.0)
        rates = [_rate(r) for r in group]
        tput = [_num(r.get("output_tokens_per_s")) for r in group]
        color = axes[0][0].plot(rates, tput, marker="o", label=name)[0].get_color()
        for ax, (key, _, scale, _unit) in zip((axes[0][1], axes[1][0], axes[1][1]), lats, strict=True):
            for q in QUANTILES:
                marker, style = LINE_STYLES[q]
                vals = [_num((r.get(key) or {}).get(q)) * scale for r in group]
                ax.plot(rates, vals, marker=marker, linestyle=style, color=color, label=f"{name} {q}")
    axes[0][0].set_title("throughput vs arrival rate")
    axes[0][0].set_ylabel("output tokens/s")
    for ax, (_, name, _, unit) in zip((axes[0][1], axes[1][0], axes[1][1]), lats, strict=True):
        ax.set_title(f"{name} vs arrival rate")
        ax.set_ylabel(unit)
    for row in axes:
        for ax in row:
            ax.set_xlabel("arrival rate (requests/s)")
            ax.legend(fontsize="small")
            ax.grid(alpha=0.3)
