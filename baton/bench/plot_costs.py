"""Charts of `baton bench costs` results (drawn by `baton bench plot`): one panel per cost curve, one line per
result file. A curve a file did not measure is left out of its panel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (result key, x key, x label, [(y key, y label suffix)], panel title)
PANELS: tuple[tuple[str, str, str, tuple[tuple[str, str], ...], str], ...] = (
    ("decode_vs_batch", "batch", "batch size (rows)", (("step_ms", "decode step"),),
     "decode step vs batch size"),
    ("decode_vs_context", "context", "context length (tokens)", (("step_ms", "decode step"),),
     "decode step vs context length"),
    ("splice_vs_batch", "batch", "batch size (rows)", (("splice_ms_mean", "splice"), ("step_ms_median", "decode step")),
     "splice of one request vs batch size"),
    ("kv_shipping", "prompt_tokens", "prompt length (tokens)",
     (("ship_ms", "KV shipping"), ("prefill_ms", "prefill")), "KV shipping vs that prompt's prefill"),
)


def is_costs(run: dict[str, Any]) -> bool:
    return run.get("kind") == "costs"


def _label(run: dict[str, Any], several: bool) -> str:
    if run.get("label"):
        return str(run["label"])
    return f"{run.get('device', '?')} {run.get('dtype', '')} {run.get('date', '')}".strip() if several else ""


def _fixed(section: dict[str, Any]) -> str:
    """What the panel holds fixed, e.g. "context 256"."""
    return ", ".join(f"{k} {v}" for k, v in section.items() if k in ("context", "batch", "prompt"))


def plot_costs(runs: list[dict[str, Any]], output: Path, title: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    several = len(runs) > 1
    for ax, (key, xkey, xlabel, series, name) in zip([a for row in axes for a in row], PANELS):
        fixed, ticks = "", set()
        for run in runs:
            section = run.get(key)
            if not isinstance(section, dict) or not section.get("points"):
                continue
            fixed = _fixed(section)
            pts = sorted(section["points"], key=lambda p: p[xkey])
            xs = [p[xkey] for p in pts]
            ticks.update(xs)
            prefix = _label(run, several)
            for (ykey, what), style in zip(series, ("-", "--")):
                ax.plot(xs, [p.get(ykey) for p in pts], marker="o", linestyle=style,
                        label=f"{prefix} {what}".strip())
        ax.set_title(f"{name} ({fixed})" if fixed else name)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.minorticks_off()
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    first = runs[0]
    fig.suptitle(title or f"cost curves: {first.get('model')} on {first.get('device')} ({first.get('dtype')})")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return "costs"
