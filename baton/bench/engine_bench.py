"""`baton bench engine`: one or more serving policies on one drawn workload, in one process.

    baton bench engine --policy baton,orca,padded,static,hf-static,hf-cb --workload mixed --out-dir results/

Each policy gets a short untimed warm-up (a two-request run through the same code path), then serves the
workload in real time. Every policy of one invocation serves the very same drawn requests, one after another,
and the comparison table puts each against the first: machines are noisy, so compare within one run.

Output: one JSON object per policy (--out FILE.json for one policy, FILE-<policy>.json for several; or
--out-dir DIR), plus a summary on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baton.bench.workloads import WORKLOADS, BenchRequest, WorkloadSpec, draw, get_workload

if TYPE_CHECKING:
    from baton.bench.baselines import RunResult
    from baton.engine.models import LoadedModel

PERCENTILES = (50, 90, 99)


# ---- command line ----------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from baton.bench.baselines import POLICIES
    from baton.flags import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--policy", default="baton",
                   help=f"one policy or several, comma separated, run in order: {','.join(POLICIES)} "
                        "(ratios in the table are against the first)")
    p.add_argument("--workload", default="mixed", choices=sorted(WORKLOADS),
                   help="named workload (default: mixed)")
    p.add_argument("--num-requests", type=int, help="override the workload's number of requests")
    p.add_argument("--prompt-min", type=int, help="override the shortest prompt (tokens)")
    p.add_argument("--prompt-max", type=int, help="override the longest prompt (tokens)")
    p.add_argument("--output-min", type=int, help="override the fewest output tokens")
    p.add_argument("--output-max", type=int, help="override the most output tokens")
    p.add_argument("--max-batch", type=int, help="override the largest batch (rows)")
    p.add_argument("--rate", type=float, help="Poisson arrival rate in requests/s (default for poisson: 1.0)")
    p.add_argument("--seed", type=int, help="seed of the drawn workload (default 0)")
    p.add_argument("--out", type=Path, help="result JSON file; with several policies FILE-<policy>.json")
    p.add_argument("--out-dir", type=Path, help="directory for <workload>[-rate<R>]-<policy>.json files")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up run of each policy")


def main(args: argparse.Namespace) -> int:
    from baton.bench.baselines import POLICIES
    from baton.engine.models import load_model

    policies = [p.strip() for p in str(args.policy).split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if not policies or bad:
        print(f"baton bench engine: unknown policy {bad or policies!r}; choose from {', '.join(POLICIES)}",
              file=sys.stderr)
        return 2
    if len(set(policies)) != len(policies):
        print("baton bench engine: a policy is named twice", file=sys.stderr)
        return 2
    if args.out is not None and args.out_dir is not None:
        print("baton bench engine: give --out or --out-dir, not both", file=sys.stderr)
        return 2
    try:
        spec = get_workload(
            args.workload, num_requests=args.num_requests, prompt_min=args.prompt_min,
            prompt_max=args.prompt_max, output_min=args.output_min, output_max=args.output_max,
            max_batch=args.max_batch, rate=args.rate, seed=args.seed,
        )
    except ValueError as e:
        print(f"baton bench engine: {e}", file=sys.stderr)
        return 2
    lm = load_model(args.model, device=args.device, dtype=args.dtype, cpu_gemm=args.cpu_gemm,
                    cpu_attention=args.cpu_attention)
    def save(report: dict[str, Any]) -> None:
        several = [report] * len(policies)  # names as if all were done: FILE-<policy>.json when several
        path = output_paths(several, args.out, args.out_dir)[0]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=2) + "\n")

    reports = run_bench(lm, spec, policies, warmup=not args.no_warmup, progress=True, on_report=save)
    paths = output_paths(reports, args.out, args.out_dir)
    print()
    print(comparison_table(reports))
    written = [str(p) for p in paths if p is not None]
    print("\nwrote " + ", ".join(written) if written else "\n(no --out/--out-dir: results not saved)")
    return 0


def output_paths(reports: list[dict[str, Any]], out: Path | None, out_dir: Path | None) -> list[Path | None]:
    if out is not None and out_dir is not None:
        raise ValueError("give --out or --out-dir, not both")
    if out is not None:
        if len(reports) == 1:
            return [out]
        suffix = out.suffix or ".json"
        return [out.with_name(f"{out.stem}-{r['policy']}{suffix}") for r in reports]
    if out_dir is not None:
        paths: list[Path | None] = []
        for r in reports:
            rate = f"-rate{r['rate']:g}" if r.get("rate") is not None else ""
            paths.append(out_dir / f"{r['workload']}{rate}-{r['policy']}.json")
        return paths
    return [None] * len(reports)


# ---- running ---------------------------------------------------------------------------------------------
def run_bench(lm: LoadedModel, spec: WorkloadSpec, policies: list[str], warmup: bool = True,
              progress: bool = False,
              on_report: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Draw `spec` once and run every policy on it; one report dict per policy, each also passed to on_report
    as soon as it is ready (so a long run that is interrupted keeps what it measured)."""
    from baton.bench.baselines import run_policy

    reqs = draw(spec, lm.tokenizer, int(lm.config.vocab_size))
    if progress:
        total_out = sum(r.max_new_tokens for r in reqs)
        arrivals = "all at t=0" if spec.rate is None else f"Poisson at {spec.rate:g} req/s"
        print(f"workload {spec.name}: {len(reqs)} requests, prompts {spec.prompt_min}..{spec.prompt_max} "
              f"tokens, outputs {spec.output_min}..{spec.output_max} ({total_out} in all), max batch "
              f"{spec.max_batch}, {arrivals}, seed {spec.seed}")
    run_id = uuid.uuid4().hex[:12]
    reports = []
    for policy in policies:
        if warmup:
            run_policy(policy, lm, warmup_requests(reqs), spec.max_batch)
        if progress:
            print(f"  {policy}: running ...", flush=True)
        with MemoryWatch(lm) as mem:
            result = run_policy(policy, lm, reqs, spec.max_batch)
        report = make_report(result, spec, lm, reqs, mem, run_id, policies)
        reports.append(report)
        if on_report is not None:
            on_report(report)
        if progress:
            print("  " + one_line(report), flush=True)
    return reports


def warmup_requests(reqs: list[BenchRequest]) -> list[BenchRequest]:
    """Two short requests (prompts cut from the workload's own), all arriving at once."""
    src = reqs[0].prompt_ids
    return [BenchRequest(i, src[: max(1, min(8, len(src)) - i)], 2, 0.0) for i in range(2)]


class MemoryWatch:
    """Peak resident memory of this process during a block. Linux: the kernel's high-water mark (VmHWM),
    reset at entry through /proc/self/clear_refs; elsewhere a 5 ms psutil sampler. Also the CUDA allocator's
    peak."""

    def __init__(self, lm: LoadedModel) -> None:
        self.cuda = lm.device.type == "cuda"
        self.rss_before_mb = 0.0
        self.peak_rss_mb = 0.0
        self.peak_gpu_mb: float | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> MemoryWatch:
        import psutil

        self.rss_before_mb = psutil.Process().memory_info().rss / 2**20
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if _reset_hwm():
            self.method = "VmHWM"
        else:
            self.method = "psutil-sampled"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.is_set():
            self._sampled = max(self._sampled, proc.memory_info().rss)
            self._stop.wait(0.005)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_rss_mb = self._sampled / 2**20
        else:
            self.peak_rss_mb = (_read_hwm_kb() or 0) / 1024
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.peak_gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _read_hwm_kb() is not None


def _read_hwm_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# ---- reporting -------------------------------------------------------------------------------------------
def percentiles(xs: list[float]) -> dict[str, float | None]:
    import numpy as np

    out: dict[str, float | None] = {f"p{q}": None for q in PERCENTILES}
    out["mean"] = None
    if xs:
        a = np.asarray(xs, dtype=float)
        out.update({f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES})
        out["mean"] = float(a.mean())
    return out


def machine_info(lm: LoadedModel) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(lm.device) if lm.device.type == "cuda" else None,
    }
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil is a dependency
        pass
    return info


def make_report(result: RunResult, spec: WorkloadSpec, lm: LoadedModel, reqs: list[BenchRequest],
                mem: MemoryWatch, run_id: str, policies: list[str]) -> dict[str, Any]:
    rs = result.requests
    out_tokens = sum(r.output_tokens for r in rs)
    dur = result.duration_s
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) for r in rs if r.output_tokens > 1]
    return {
        "kind": "engine",
        "policy": result.policy,
        "workload": spec.name,
        "seed": spec.seed,
        "model": lm.name,
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "max_batch": spec.max_batch,
        "num_requests": len(rs),
        "prompt_min": spec.prompt_min,
        "prompt_max": spec.prompt_max,
        "output_min": spec.output_min,
        "output_max": spec.output_max,
        "rate": spec.rate,
        "workload_params": spec.params(),
        "prompt_tokens": sum(r.prompt_len for r in reqs),
        "output_tokens": out_tokens,
        "requested_output_tokens": sum(r.max_new_tokens for r in reqs),
        "duration_s": dur,
        "output_tokens_per_s": out_tokens / dur if dur > 0 else None,
        "requests_per_s": len(rs) / dur if dur > 0 else None,
        "ttft_s": percentiles([r.ttft_s for r in rs]),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles([r.e2e_s for r in rs]),
        "idle_token_rows": result.idle_token_rows,
        "masked_kv_fraction": result.masked_kv_fraction,
        "splice_ms_mean": result.splice_ms_mean,
        "peak_rss_mb": mem.peak_rss_mb,
        "rss_before_mb": mem.rss_before_mb,
        "peak_rss_method": mem.method,
        "process_peak_rss_mb": _ru_maxrss_mb(),
        "peak_gpu_mb": mem.peak_gpu_mb,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(lm),
        "run_id": run_id,
        "run_policies": list(policies),
        "stats": result.stats,
        "requests": [
            {"index": r.index, "prompt_len": r.prompt_len, "output_tokens": r.output_tokens,
             "arrival_s": r.arrival_s, "ttft_s": r.ttft_s, "e2e_s": r.e2e_s}
            for r in rs
        ],
    }


def _ru_maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform == "darwin" else kb / 1024  # bytes on macOS, KiB on Linux


def _fmt(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def one_line(r: dict[str, Any]) -> str:
    return (f"{r['policy']}: {_fmt(r['output_tokens_per_s'], digits=1)} tok/s, "
            f"{_fmt(r['requests_per_s'])} req/s, "
            f"TTFT p50 {_fmt(r['ttft_s']['p50'])} s, TPOT p50 {_fmt(r['tpot_s']['p50'], 1000, 1)} ms, "
            f"e2e p50 {_fmt(r['e2e_s']['p50'])} s, p99 {_fmt(r['e2e_s']['p99'])} s, "
            f"idle rows {_fmt(r['idle_token_rows'], 100, 1)}%, "
            f"masked KV {_fmt(r['masked_kv_fraction'], 100, 1)}%, "
            f"peak RSS {r['peak_rss_mb']:.0f} MB, {r['duration_s']:.1f} s")


def comparison_table(reports: list[dict[str, Any]]) -> str:
    """A fixed-width table, ratios against the first report."""
    if not reports:
        return ""
    base = reports[0]

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or not b else f"{a / b:.2f}x"

    head = ["policy", "tok/s", "req/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "e2e p50", "e2e p99",
            "idle rows", "masked KV", "splice", "peak RSS", "tok/s vs", "e2e p50 vs"]
    units = ["", "", "", "s", "s", "ms", "ms", "s", "s", "%", "%", "ms", "MB", base["policy"], base["policy"]]
    rows = [head, units]
    for r in reports:
        rows.append([
            r["policy"], _fmt(r["output_tokens_per_s"], digits=1), _fmt(r["requests_per_s"], digits=3),
            _fmt(r["ttft_s"]["p50"]), _fmt(r["ttft_s"]["p99"]),
            _fmt(r["tpot_s"]["p50"], 1000, 1), _fmt(r["tpot_s"]["p99"], 1000, 1),
            _fmt(r["e2e_s"]["p50"]), _fmt(r["e2e_s"]["p99"]),
            _fmt(r["idle_token_rows"], 100, 1), _fmt(r["masked_kv_fraction"], 100, 1),
            _fmt(r["splice_ms_mean"], digits=2), f"{r['peak_rss_mb']:.0f}",
            ratio(r["output_tokens_per_s"], base["output_tokens_per_s"]),
            ratio(r["e2e_s"]["p50"], base["e2e_s"]["p50"]),
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    def fmt_row(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    lines = [fmt_row(row) for row in rows]
    first = reports[0]
    title = (f"{first['workload']} workload, {first['num_requests']} requests, "
             f"max batch {first['max_batch']}, seed {first['seed']}, "
             f"model {first['model']} on {first['device']} ({first['dtype']}), "
             f"{first['machine']['cpu_count']} CPUs, {time.strftime('%Y-%m-%d')}")
    return "\n".join([title, *lines])
