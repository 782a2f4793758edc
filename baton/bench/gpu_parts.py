"""The four parts of `baton bench gpu` (baton/bench/gpu.py runs each in a process of its own), each filling one
`PartRecord`, saved as JSON after every step so that a part stopped at its time limit keeps what it measured:

1. exactness: the engine's greedy outputs under `baton`, `orca` and `padded` equal `generate()` alone
   (exactness.py), for the test suite's tiny models and the Llama-3.2-1B shape, in float32;
2. engine: `baton bench engine` on `mixed` for each shape, policies baton, orca, static and hf-cb (idle
   token-rows and masked KV in each report);
3. decode: steady decode at two batch sizes against the bare dense loop, and the cost of one splice
   (microbench.py), each step set against its memory floor at the bandwidth measured here (roofline.py);
4. service: `baton serve` (router, one prefill and one decode worker sharing the device) loaded by `baton bench
   serve` with `mixed`, against the in-process engine on the very same requests.

A dry run (`Plan.dry_run`) is the same code on the CPU in float32, with every real shape scaled down
(shapes.py) and workloads of a few short requests: seconds, not minutes.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from baton.bench.shapes import build, get_shape, label

PART_NAMES = {1: "exactness", 2: "engine", 3: "decode", 4: "service"}
ENGINE_POLICIES = ("baton", "orca", "static", "hf-cb")
# How much of a part's time a shape gets, relative to the others (decode steps of the 8B take about twice the 1B's).
SHAPE_WEIGHT = {"llama-3-8b": 2.0}


@dataclass
class Plan:
    """What every part is told: where results go, on what, and how big."""

    out_dir: Path
    dry_run: bool
    device: str
    shapes: list[str]  # parts 2 and 3
    service_shape: str  # part 4
    threads: int = 0
    budget_s: float = 0.0  # this part's time limit (the parent kills it then); 0: none

    @property
    def dtype(self) -> str:
        """Benchmarks' dtype (part 1 always runs float32)."""
        return "float32" if self.dry_run else "bfloat16"

    def part_path(self, part: int) -> Path:
        return self.out_dir / f"part{part}-{PART_NAMES[part]}.json"

    def model(self, name: str, dtype: str, seed: int = 0) -> Any:
        return build(name, self.device, dtype, scaled_down=self.dry_run, seed=seed)


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class PartRecord:
    """One part's JSON file: status ("running", then "ok", "error", "timeout" or "skipped"), when, how long, the
    error if any, a few headline numbers and the full results."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fresh(cls, plan: Plan, part: int) -> PartRecord:
        return cls(plan.part_path(part), {
            "part": part, "name": PART_NAMES[part], "status": "running", "dry_run": plan.dry_run,
            "device": plan.device, "started": now_iso(), "budget_s": plan.budget_s or None, "duration_s": None,
            "error": None, "headline": {}, "results": {},
        })

    @classmethod
    def start(cls, plan: Plan, part: int) -> PartRecord:
        rec = cls.fresh(plan, part)
        rec.save()
        return rec

    @classmethod
    def load(cls, path: Path) -> PartRecord | None:
        try:
            return cls(path, json.loads(path.read_text()))
        except (OSError, ValueError):
            return None

    @property
    def results(self) -> dict[str, Any]:
        results: dict[str, Any] = self.data["results"]
        return results

    @property
    def headline(self) -> dict[str, Any]:
        headline: dict[str, Any] = self.data["headline"]
        return headline

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)

    def finish(self, status: str, error: str | None = None, t0: float | None = None) -> None:
        self.data["status"] = status
        if error is not None:
            self.data["error"] = error
        if t0 is not None:
            self.data["duration_s"] = time.monotonic() - t0
        self.save()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shape_deadlines(shapes: list[str], deadline: float | None) -> Callable[[str], float | None]:
    """A soft deadline for each shape in turn: the time left until `deadline`, shared among the shapes not yet
    begun by SHAPE_WEIGHT (a shape that finishes early leaves its time to the next)."""
    left = list(shapes)

    def next_deadline(name: str) -> float | None:
        weights = [SHAPE_WEIGHT.get(s, 1.0) for s in left]
        share = SHAPE_WEIGHT.get(name, 1.0) / sum(weights)
        left.remove(name)
        return None if deadline is None else time.monotonic() + (deadline - time.monotonic()) * share

    return next_deadline


def _guarded(rec: PartRecord, key: str, fn: Callable[[], None]) -> None:
    """Run one shape's (or model's) share of a part: an error is recorded under `key` and the part goes on."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - one model's failure must not hide the others' results
        rec.results.setdefault(key, {})
        rec.results[key]["status"] = "error"
        rec.results[key]["error"] = f"{type(e).__name__}: {e}"
        rec.results[key]["traceback"] = traceback.format_exc(limit=20)
        print(f"  {key}: {type(e).__name__}: {e}", flush=True)
        rec.save()
    finally:
        free_memory()


def each_shape(plan: Plan, rec: PartRecord, deadline: float | None,
               measure: Callable[[str, str, float | None], None]) -> None:
    """`measure(name, key, shape_deadline)` for every shape of the plan in turn, each within its share of the
    part's time (shape_deadlines) and guarded (its failure recorded under its key, _guarded)."""
    next_deadline = shape_deadlines(plan.shapes, deadline)
    for name in plan.shapes:
        key = label(name, plan.dry_run)
        _guarded(rec, key, functools.partial(measure, name, key, next_deadline(name)))


def passed(deadline: float | None) -> bool:
    """Whether a soft deadline has passed (None: there is none)."""
    return deadline is not None and time.monotonic() > deadline


# ---- part 1: exactness ------------------------------------------------------------------------------------
def part_exactness(plan: Plan, rec: PartRecord, deadline: float | None) -> None:
    from baton.bench.exactness import check, staggered_cases

    if torch.cuda.is_available():  # float32 means float32: no TF32 matrix products
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rec.results["float32_matmul_precision"] = torch.get_float32_matmul_precision()
    # (shape, requests, longest prompt, most new tokens)
    models = [("tiny-llama", 6, 40, 10), ("tiny-gpt2", 6, 40, 10), ("llama-3.2-1b", 4, 64, 8)]
    for name, n, prompt_max, new_max in models:
        key = label(name, plan.dry_run)

        def one(name: str = name, n: int = n, prompt_max: int = prompt_max, new_max: int = new_max,
                key: str = key) -> None:
            lm = plan.model(name, "float32")
            result = check(lm, staggered_cases(int(lm.config.vocab_size), n, prompt_max, new_max))
            rec.results[key] = {"status": "ok", **result}
            rec.headline[key] = result["exact"]
            print(f"  {key}: " + ", ".join(f"{p} {'exact' if v['exact'] else 'DIVERGED'}"
                                           for p, v in result["policies"].items()), flush=True)
            rec.save()

        _guarded(rec, key, one)
    checked = [v for v in rec.results.values() if isinstance(v, dict) and "exact" in v]
    rec.headline["all_exact"] = len(checked) == len(models) and all(v["exact"] for v in checked)


# ---- part 2: the engine benchmark ---------------------------------------------------------------------------
def engine_workload(plan: Plan) -> Any:
    from baton.bench.workloads import get_workload

    if plan.dry_run:
        return get_workload("mixed", num_requests=6, prompt_min=8, prompt_max=40, output_min=2, output_max=8,
                            max_batch=4)
    return get_workload("mixed")


def engine_summary(r: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one `baton bench engine` report worth a glance."""
    return {
        "output_tokens_per_s": r["output_tokens_per_s"], "requests_per_s": r["requests_per_s"],
        "duration_s": r["duration_s"], "ttft_p50_s": r["ttft_s"]["p50"], "ttft_p99_s": r["ttft_s"]["p99"],
        "tpot_p50_ms": None if r["tpot_s"]["p50"] is None else 1e3 * r["tpot_s"]["p50"],
        "e2e_p50_s": r["e2e_s"]["p50"], "idle_token_rows": r["idle_token_rows"],
        "masked_kv_fraction": r["masked_kv_fraction"], "splice_ms_mean": r["splice_ms_mean"],
        "peak_gpu_mb": r["peak_gpu_mb"],
    }


def part_engine(plan: Plan, rec: PartRecord, deadline: float | None) -> None:
    from baton.bench.engine_bench import run_bench

    spec = engine_workload(plan)
    rec.results["workload"] = spec.params()
    rec.results["policies"] = list(ENGINE_POLICIES)

    def one(name: str, key: str, shape_deadline: float | None) -> None:
        lm = plan.model(name, plan.dtype)
        out: dict[str, Any] = {"status": "running", "model": lm.name, "dtype": plan.dtype, "policies": {},
                               "skipped": [], "reports": []}
        rec.results[key] = out
        for i, policy in enumerate(ENGINE_POLICIES):
            if i and passed(shape_deadline):
                out["skipped"].append(policy)  # this shape's share of the part's time is spent
                continue
            try:
                report = run_bench(lm, spec, [policy], warmup=True, progress=True)[0]
            except Exception as e:  # noqa: BLE001 - a baseline's failure leaves the others' numbers
                out["policies"][policy] = {"error": f"{type(e).__name__}: {e}"}
                print(f"  {policy}: {type(e).__name__}: {e}", flush=True)
            else:
                out["policies"][policy] = engine_summary(report)
                out["reports"].append(report)
            free_memory()
            rec.save()
        tok = {p: v.get("output_tokens_per_s") for p, v in out["policies"].items()}
        base = tok.get("baton")
        out["baton_over"] = {p: base / t for p, t in tok.items() if p != "baton" and base and t}
        failed = [p for p, v in out["policies"].items() if "error" in v]
        out["status"] = "error" if failed else "ok"
        rec.headline[key] = {"output_tokens_per_s": tok, "baton_over": out["baton_over"],
                             "skipped": out["skipped"]}
        rec.save()

    each_shape(plan, rec, deadline, one)


# ---- part 3: steady decode and splice ----------------------------------------------------------------------
@dataclass(frozen=True)
class DecodeSizes:
    batches: tuple[int, ...]
    context: int
    steps: int
    rounds: int
    splice_batch: int
    splice_context: int
    splice_prompt: int
    splice_repeats: int
    copy_bytes: int


REAL_DECODE = DecodeSizes((32, 64), 512, 24, 3, 32, 1024, 512, 8, 2 << 30)
DRY_DECODE = DecodeSizes((2, 4), 32, 3, 1, 4, 48, 16, 2, 32 << 20)


def part_decode(plan: Plan, rec: PartRecord, deadline: float | None) -> None:
    import statistics

    from baton.bench.microbench import time_bare_steps, time_baton_steps, time_splice
    from baton.bench.roofline import floor, measure_bandwidth

    sizes = DRY_DECODE if plan.dry_run else REAL_DECODE
    bw = measure_bandwidth(torch.device(plan.device), sizes.copy_bytes)
    gbps = bw["best_gb_per_s"]
    rec.results["bandwidth"] = bw
    rec.results["sizes"] = sizes.__dict__
    rec.headline["bandwidth_gb_per_s"] = gbps
    print(f"  memory bandwidth (copy of {sizes.copy_bytes >> 20} MiB): {gbps:.0f} GB/s", flush=True)

    def one(name: str, key: str, shape_deadline: float | None) -> None:
        lm = plan.model(name, plan.dtype)
        out: dict[str, Any] = {"status": "running", "model": lm.name, "dtype": plan.dtype, "batches": {},
                               "skipped": []}
        rec.results[key] = out
        with torch.inference_mode():
            for i, batch in enumerate(sizes.batches):
                if i and passed(shape_deadline):
                    out["skipped"].append(f"batch {batch}")
                    continue
                baton_s, bare_s = [], []
                for _ in range(sizes.rounds):  # interleaved, so drift hits both alike
                    baton_s.append(time_baton_steps(lm, batch, sizes.context, sizes.steps))
                    bare_s.append(time_bare_steps(lm, batch, sizes.context, sizes.steps))
                    free_memory()
                b_ms, r_ms = 1e3 * statistics.median(baton_s), 1e3 * statistics.median(bare_s)
                fl = floor(lm, batch, sizes.context, gbps)
                out["batches"][str(batch)] = {
                    "context": sizes.context, "baton_step_ms": b_ms, "bare_step_ms": r_ms,
                    "baton_tokens_per_s": 1e3 * batch / b_ms, "bare_tokens_per_s": 1e3 * batch / r_ms,
                    "baton_over_bare_throughput": r_ms / b_ms, **fl,
                    "baton_over_floor": b_ms / fl["floor_ms"], "bare_over_floor": r_ms / fl["floor_ms"],
                }
                print(f"  {key}, batch {batch}, context {sizes.context}: baton {b_ms:.2f} ms/step, bare "
                      f"{r_ms:.2f} ms/step ({100 * r_ms / b_ms:.1f}%), memory floor {fl['floor_ms']:.2f} ms "
                      f"(weights alone {fl['weights_ms']:.2f} ms)", flush=True)
                rec.save()
            if passed(shape_deadline):
                out["skipped"].append("splice")
            else:
                splice = time_splice(lm, sizes.splice_batch, sizes.splice_context, sizes.splice_prompt,
                                     sizes.splice_repeats)
                out["splice"] = {"batch": sizes.splice_batch, "context": sizes.splice_context,
                                 "prompt": sizes.splice_prompt, **splice,
                                 **floor(lm, sizes.splice_batch, sizes.splice_context, gbps)}
                print(f"  {key}, splice of {sizes.splice_prompt} tokens into {sizes.splice_batch} rows at "
                      f"context {sizes.splice_context}: {splice['splice_ms_mean']:.2f} ms vs a "
                      f"{splice['step_ms_median']:.2f} ms step", flush=True)
        out["status"] = "ok"
        rec.headline[key] = {
            "baton_over_bare": {b: v["baton_over_bare_throughput"] for b, v in out["batches"].items()},
            "baton_step_ms": {b: v["baton_step_ms"] for b, v in out["batches"].items()},
            "floor_ms": {b: v["floor_ms"] for b, v in out["batches"].items()},
            "splice_over_step": out.get("splice", {}).get("splice_over_step"),
        }
        rec.save()

    each_shape(plan, rec, deadline, one)


# ---- part 4: the service on one device ----------------------------------------------------------------------
def serve_summary(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "output_tokens_per_s": r["output_tokens_per_s"], "requests_per_s": r["requests_per_s"],
        "duration_s": r["duration_s"], "requests_completed": r["requests_completed"],
        "requests_failed": r["requests_failed"], "errors": r["errors"], "ttft_p50_s": r["ttft_s"]["p50"],
        "ttft_p99_s": r["ttft_s"]["p99"], "itl_p50_ms": None if r["itl_s"]["p50"] is None else 1e3 * r["itl_s"]["p50"],
        "e2e_p50_s": r["e2e_s"]["p50"],
    }


def part_service(plan: Plan, rec: PartRecord, deadline: float | None) -> None:
    from baton.bench.engine_bench import run_bench
    from baton.bench.local_service import local_service, missing_modules
    from baton.bench.shapes import save_model_dir

    missing = missing_modules()
    rec.results["missing_modules"] = missing
    if missing:
        rec.data["status"] = "skipped"
        rec.results["reason"] = ("the service cannot start here: " +
                                 "; ".join(f"{k}: {v}" for k, v in missing.items()))
        rec.headline["skipped"] = rec.results["reason"]
        print(f"  skipped: {rec.results['reason']}", flush=True)
        return
    from baton.bench import serve_bench  # only now: it needs what missing_modules looked for

    spec = engine_workload(plan)
    key = label(plan.service_shape, plan.dry_run)
    rec.results.update({"model": key, "dtype": plan.dtype, "workload": spec.params()})
    with tempfile.TemporaryDirectory(prefix="baton-gpu-model-") as tmp:
        lm = plan.model(plan.service_shape, plan.dtype)
        model_dir = save_model_dir(lm, Path(tmp) / get_shape(plan.service_shape).name)
        # the in-process engine first, with the service's tokenizer: both draw the very same requests
        engine = run_bench(lm, spec, ["baton"], warmup=True, progress=True)[0]
        rec.results["engine"] = engine_summary(engine)
        rec.results["engine_report"] = engine
        rec.save()
        del lm
        free_memory()
        with local_service(model_dir, device=plan.device, dtype=plan.dtype, max_batch=spec.max_batch,
                           threads=plan.threads) as address:
            out = plan.out_dir / "part4-service-bench.json"
            p = argparse.ArgumentParser()
            serve_bench.add_arguments(p)
            args = p.parse_args([
                "--url", address, "--model", str(model_dir), "--workload", spec.name, "--rate", "inf",
                "--requests", str(spec.num_requests), "--seed", str(spec.seed),
                "--prompt-min", str(spec.prompt_min), "--prompt-max", str(spec.prompt_max),
                "--output-min", str(spec.output_min), "--output-max", str(spec.output_max),
                "--policy", "baton", "--out", str(out), "--no-progress",
            ])
            code = serve_bench.main(args)
        if not out.exists():
            raise RuntimeError(f"baton bench serve ended with code {code} and no results (its reason is in the log)")
        service = json.loads(out.read_text())
        out.unlink()
    rec.results["service"] = serve_summary(service)
    rec.results["service_report"] = service
    e, s = engine["output_tokens_per_s"], service["output_tokens_per_s"]
    rec.results["service_over_engine"] = s / e if e and s else None
    rec.headline.update({"engine_tokens_per_s": e, "service_tokens_per_s": s,
                         "service_over_engine": rec.results["service_over_engine"],
                         "completed": f"{service['requests_completed']}/{service['num_requests']}"})
    if code != 0 or service["requests_failed"]:
        raise RuntimeError(f"baton bench serve: exit code {code}, {service['requests_failed']} requests failed")


PARTS: dict[int, Callable[[Plan, PartRecord, float | None], None]] = {
    1: part_exactness, 2: part_engine, 3: part_decode, 4: part_service,
}


def run_part(plan: Plan, part: int) -> int:
    """Run one part in this process, recording it in its JSON file; 0 when it ended ok or skipped."""
    t0 = time.monotonic()
    # a soft deadline, a little before the parent's hard one: what is left unstarted then is recorded skipped
    deadline = t0 + 0.85 * plan.budget_s if plan.budget_s else None
    rec = PartRecord.start(plan, part)
    print(f"part {part} ({PART_NAMES[part]}) on {plan.device}"
          f"{f', {plan.budget_s:.0f} s at most' if plan.budget_s else ''}", flush=True)
    try:
        PARTS[part](plan, rec, deadline)
    except Exception as e:  # noqa: BLE001 - recorded in the part's file, which the parent reads
        rec.results["traceback"] = traceback.format_exc(limit=20)
        rec.finish("error", f"{type(e).__name__}: {e}", t0)
        print(f"part {part}: {type(e).__name__}: {e}", flush=True)
        return 1
    if rec.data["status"] == "skipped":
        rec.finish("skipped", t0=t0)
        return 0
    failed = [k for k, v in rec.results.items() if isinstance(v, dict) and v.get("status") == "error"]
    rec.finish("error" if failed else "ok", f"failed: {', '.join(failed)}" if failed else None, t0)
    return 1 if failed else 0
