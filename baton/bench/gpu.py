"""`baton bench gpu`: the prepared GPU run, every measurement in one command within a time budget.

    baton bench gpu --out-dir results/gpu                 # on a CUDA machine (scripts/bench_gpu.sh, make bench-gpu)
    baton bench gpu --dry-run --out-dir /tmp/gpu-dry      # the same run on the CPU, tiny: what `make test` runs

It first prints (and saves) the versions it found: torch, CUDA, transformers, the GPU. Then it runs the parts of
baton/bench/gpu_parts.py, each in a process of its own under a time limit (killed past it, with what it measured
kept), one after another: 1 exactness, 2 engine, 3 decode, 4 service. Models are built from named shapes with
random weights straight on the device (baton/bench/shapes.py), so nothing has to be downloaded.

Output, all in --out-dir: versions.json, part<N>-<name>.json for each part (status ok, error, timeout or
skipped, with the error and what was measured until then), summary.json (every part's status and headline
numbers) and bench_gpu.log (everything printed). A part that fails is recorded and the next one runs; the exit
code is 0 when every part ended ok or skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from baton.bench.gpu_parts import PART_NAMES, PartRecord, Plan, now_iso, run_part
from baton.bench.shapes import SHAPES
from baton.flags import env_default

# Seconds each part may take on the GPU (the whole run stays within --budget-s, 8 minutes at most by default).
GPU_BUDGET_S = {1: 50.0, 2: 190.0, 3: 90.0, 4: 120.0}
DRY_BUDGET_S = {1: 120.0, 2: 120.0, 3: 120.0, 4: 180.0}
PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "numpy", "grpcio", "protobuf",
            "grpcio-health-checking", "grpcio-reflection", "redis", "prometheus-client", "psutil", "tqdm",
            "fastapi", "uvicorn")
LOG_NAME = "bench_gpu.log"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out-dir", type=Path, default=Path(env_default("out_dir", "results/gpu") or "results/gpu"),
                   help="where every result goes (default results/gpu)")
    p.add_argument("--dry-run", action="store_true",
                   default=(env_default("dry_run", "") or "").lower() not in ("", "0", "false", "no"),
                   help="the same run on the CPU in float32 with every shape scaled down and a few requests "
                        "(BATON_DRY_RUN=1)")
    p.add_argument("--parts", default="1,2,3,4", help="which parts, comma separated (1 exactness, 2 engine, "
                                                     "3 decode, 4 service)")
    p.add_argument("--shapes", default="llama-3.2-1b,llama-3-8b",
                   help=f"model shapes of parts 2 and 3, comma separated: {', '.join(SHAPES)}")
    p.add_argument("--service-shape", default="llama-3.2-1b", help="model shape of part 4")
    p.add_argument("--device", help="default: cuda (cpu with --dry-run)")
    p.add_argument("--budget-s", type=float, help="the whole run's time limit in seconds (default: the sum of "
                                                  "the parts' limits)")
    p.add_argument("--part-budget-s", help="time limits of parts in seconds, e.g. 2=240,4=90 (defaults: "
                                           + ", ".join(f"{k}={v:g}" for k, v in GPU_BUDGET_S.items()) + ")")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in every process (0: torch's default)")
    p.add_argument("--part", type=int, choices=sorted(PART_NAMES), help=argparse.SUPPRESS)  # a child: one part


def _parse_parts(text: str) -> list[int]:
    parts = [int(x) for x in text.split(",") if x.strip()]
    if not parts or any(x not in PART_NAMES for x in parts):
        raise ValueError(f"--parts: choose among {sorted(PART_NAMES)}, got {text!r}")
    return parts


def _parse_budgets(text: str | None, dry_run: bool) -> dict[int, float]:
    budgets = dict(DRY_BUDGET_S if dry_run else GPU_BUDGET_S)
    for item in (text or "").split(","):
        if item.strip():
            k, _, v = item.partition("=")
            if int(k) not in PART_NAMES or float(v) <= 0:
                raise ValueError(f"--part-budget-s: expected PART=SECONDS, got {item!r}")
            budgets[int(k)] = float(v)
    return budgets


def main(args: argparse.Namespace) -> int:
    try:
        parts = _parse_parts(args.parts)
        budgets = _parse_budgets(args.part_budget_s, args.dry_run)
        shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        unknown = [s for s in [*shapes, args.service_shape] if s not in SHAPES]
        if unknown or not shapes:
            raise ValueError(f"unknown shape {unknown or shapes!r}: choose among {', '.join(SHAPES)}")
    except ValueError as e:
        print(f"baton bench gpu: {e}", file=sys.stderr)
        return 2
    device = args.device or ("cpu" if args.dry_run else "cuda")
    plan = Plan(args.out_dir, args.dry_run, device, shapes, args.service_shape, args.threads)
    if args.part is not None:  # a child: one part, in this process
        plan.budget_s = budgets[args.part]
        return run_part(plan, args.part)
    return orchestrate(plan, args, parts, budgets)


# ---- versions --------------------------------------------------------------------------------------------
def versions(device: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    packages: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    cuda = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        prop = torch.cuda.get_device_properties(i)
        gpus.append({"name": prop.name, "memory_gib": round(prop.total_memory / 2**30, 1),
                     "capability": f"{prop.major}.{prop.minor}", "multiprocessors": prop.multi_processor_count})
    warnings = []
    transformers = packages.get("transformers")
    if transformers and int(transformers.split(".")[0]) < 5:
        warnings.append(f"transformers {transformers}: Baton needs >= 5.0 (pyproject.toml); parts may fail")
    if device.startswith("cuda") and not cuda:
        warnings.append("torch sees no CUDA device")
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None, "gpus": gpus,
        "transformers": transformers, "packages": packages, "baton_commit": _commit(), "device": device,
        "warnings": warnings,
    }


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def versions_line(v: dict[str, Any]) -> str:
    gpu = ", ".join(f"{g['name']} ({g['memory_gib']} GiB, sm {g['capability']})" for g in v["gpus"]) or "none"
    return (f"versions: torch {v['torch']} (CUDA {v['cuda'] or '-'}, cuDNN {v['cudnn'] or '-'}), transformers "
            f"{v['transformers']}, GPU {gpu}; python {v['python']}, {v['cpu_count']} CPUs, {v['platform']}")


# ---- running the parts -----------------------------------------------------------------------------------
class Log:
    """Everything printed goes to stdout and to bench_gpu.log."""

    def __init__(self, path: Path) -> None:
        self.file: IO[str] = path.open("a", encoding="utf-8")
        self.lock = threading.Lock()

    def write(self, text: str) -> None:
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()
            self.file.write(text)
            self.file.flush()

    def line(self, text: str) -> None:
        self.write(text + "\n")

    def close(self) -> None:
        self.file.close()


def _child_argv(plan: Plan, part: int, budget_s: float) -> list[str]:
    argv = [sys.executable, "-m", "baton.cli", "bench", "gpu", "--part", str(part), "--out-dir", str(plan.out_dir),
            "--device", plan.device, "--shapes", ",".join(plan.shapes), "--service-shape", plan.service_shape,
            "--part-budget-s", f"{part}={budget_s:g}"]
    if plan.dry_run:
        argv.append("--dry-run")
    if plan.threads:
        argv += ["--threads", str(plan.threads)]
    return argv


def run_child(plan: Plan, part: int, budget_s: float, log: Log) -> dict[str, Any]:
    """Run one part in a child process (a session of its own, so that it and whatever it started can be stopped
    together) for at most budget_s; then make sure its file says how it ended."""
    from baton.bench.local_service import child_env

    t0 = time.monotonic()
    proc = subprocess.Popen(_child_argv(plan, part, budget_s), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", env=child_env(),
                            start_new_session=True)
    assert proc.stdout is not None
    out = proc.stdout

    def relay() -> None:
        for line in out:
            log.write(line)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(budget_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        log.line(f"part {part}: past its {budget_s:g} s: stopping it")
    _end_group(proc)
    reader.join(10)
    rec = PartRecord.load(plan.part_path(part)) or PartRecord.fresh(plan, part)  # fresh: it died at once
    if rec.data["status"] == "running":
        if timed_out:
            rec.data["status"], rec.data["error"] = "timeout", f"stopped after its {budget_s:g} s"
        else:
            rec.data["status"] = "error"
            rec.data["error"] = rec.data["error"] or f"the part's process ended with code {proc.returncode}"
    rec.data.update({"returncode": proc.returncode, "timed_out": timed_out, "wall_s": time.monotonic() - t0,
                     "budget_s": budget_s})
    rec.save()
    return rec.data


def skipped_part(plan: Plan, part: int, reason: str) -> dict[str, Any]:
    """The file of a part not run, saying why."""
    rec = PartRecord.fresh(plan, part)
    rec.data["status"] = "skipped"
    rec.results["reason"] = rec.headline["skipped"] = reason
    rec.save()
    return rec.data


def _end_group(proc: subprocess.Popen[str]) -> None:
    """Stop the part's process group: the part if it still runs, and whatever it started that outlived it (the
    services of part 4): SIGTERM, then SIGKILL to what is left 20 s later."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(proc.pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def orchestrate(plan: Plan, args: argparse.Namespace, parts: list[int], budgets: dict[int, float]) -> int:
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(plan.out_dir / LOG_NAME)
    t0 = time.monotonic()
    total = args.budget_s or sum(budgets[p] for p in parts)
    summary: dict[str, Any] = {"kind": "gpu-run", "dry_run": plan.dry_run, "device": plan.device,
                               "out_dir": str(plan.out_dir), "date": now_iso(), "budget_s": total,
                               "shapes": plan.shapes, "service_shape": plan.service_shape, "parts": {}}
    try:
        v = versions(plan.device)
        summary["versions"] = v
        (plan.out_dir / "versions.json").write_text(json.dumps(v, indent=2) + "\n")
        log.line(f"baton bench gpu{' --dry-run' if plan.dry_run else ''}: device {plan.device}, parts "
                 f"{','.join(map(str, parts))}, shapes {','.join(plan.shapes)}, {total:g} s at most, into "
                 f"{plan.out_dir}")
        log.line(versions_line(v))
        for w in v["warnings"]:
            log.line(f"warning: {w}")
        if plan.device.startswith("cuda") and not v["cuda_available"]:
            summary["status"] = "error"
            summary["error"] = "torch sees no CUDA device (use --dry-run to run on the CPU)"
            log.line(f"baton bench gpu: {summary['error']}")
            return 2
        for part in parts:
            left = total - (time.monotonic() - t0)
            budget = min(budgets[part], left)
            if budget < 5:
                data = skipped_part(plan, part, "the run's time budget is spent")
                log.line(f"part {part}: skipped, the run's time budget is spent")
            else:
                log.line(f"\n=== part {part}: {PART_NAMES[part]} ({budget:g} s at most), "
                         f"{time.strftime('%H:%M:%S')} ===")
                data = run_child(plan, part, budget, log)
            summary["parts"][str(part)] = {
                "name": PART_NAMES[part], "status": data["status"], "file": plan.part_path(part).name,
                "wall_s": data.get("wall_s"), "returncode": data.get("returncode"),
                "timed_out": data.get("timed_out"), "error": data.get("error"), "headline": data.get("headline", {}),
            }
            _write_summary(plan, summary, t0)
        ok = all(p["status"] in ("ok", "skipped") for p in summary["parts"].values())
        summary["status"] = "ok" if ok else "error"
        log.line(f"\nfinished {time.strftime('%H:%M:%S')}, {time.monotonic() - t0:.0f} s; " + summary_lines(summary))
        return 0 if ok else 1
    finally:
        _write_summary(plan, summary, t0)
        log.close()


def _write_summary(plan: Plan, summary: dict[str, Any], t0: float) -> None:
    summary["duration_s"] = time.monotonic() - t0
    (plan.out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def summary_lines(summary: dict[str, Any]) -> str:
    lines = [f"summary ({summary['out_dir']}/summary.json):"]
    for n, p in summary["parts"].items():
        wall = f", {p['wall_s']:.0f} s" if p.get("wall_s") is not None else ""
        head = json.dumps(p.get("headline") or {}, default=str)
        if len(head) > 400:
            head = head[:400] + " ..."
        error = f" ({p['error']})" if p.get("error") else ""
        lines.append(f"  part {n} {p['name']}: {p['status']}{error}{wall}: {head}")
    return "\n".join(lines)
