"""Policy runners: one workload through one serving policy, timed per request.

Every runner takes (LoadedModel, list of BenchRequest, max_batch), serves the requests in real time (each
is handed over no earlier than its arrival time), greedily and ignoring EOS so that every request produces
exactly its `max_new_tokens`, and returns a `RunResult`:

- `baton`, `orca`, `padded`, `static`: baton.engine.engine.Engine under that policy (engine.py says what each does).
- `hf-static`: transformers' `model.generate()` on batches of up to max_batch requests, left padded, taken
  in arrival order; a batch starts when the previous one has finished, with the requests arrived by then.
- `hf-cb`: transformers' own continuous batching (the manager behind `model.generate_batch`), with an explicit
  `ContinuousBatchingConfig`. Requests go in through the manager's `add_request` at their arrival times, each
  with its own `max_new_tokens` and EOS disabled: `generate_batch` itself takes one `max_new_tokens` for all
  requests and submits them all at once, which would make the outputs (and arrivals) differ from the other
  policies'.

Times are seconds from the request's arrival: `ttft_s` when its first output token exists, `e2e_s` when its
last one does. Idle token rows and masked-KV fraction are given only where they are counted: the Engine counts
them; for hf-static they are derived from the padded shapes `generate()` runs (the same definitions as the
Engine's static policy); hf-cb has no such counters, so they are None there.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from baton.bench.workloads import BenchRequest
from baton.engine.models import LoadedModel

# baton-fused: baton with fuse_prefill, the prompts it prefills itself run inside the batch's iteration, as a
# decode worker runs the prompts a router sends it to prefill (prefill_here)
POLICIES = ("baton", "baton-fused", "orca", "padded", "static", "hf-static", "hf-cb")


@dataclass
class RequestResult:
    index: int
    prompt_len: int
    max_new_tokens: int
    output_tokens: int
    arrival_s: float  # from the start of the run
    ttft_s: float  # from arrival to the first output token
    e2e_s: float  # from arrival to the last output token


@dataclass
class RunResult:
    policy: str
    requests: list[RequestResult]
    duration_s: float  # from the start of the run to the last output token
    idle_token_rows: float | None = None  # fraction of token rows computed that produced nothing
    masked_kv_fraction: float | None = None  # fraction of query-key pairs computed that were masked out
    splice_ms_mean: float | None = None  # mean time of one splice (baton only)
    stats: dict[str, Any] = field(default_factory=dict)  # raw counters and notes, policy specific


def _sync(lm: LoadedModel) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize()


def _pad_id(lm: LoadedModel) -> int:
    for src in (lm.model.generation_config, lm.config):
        pad = getattr(src, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    if lm.tokenizer is not None and isinstance(lm.tokenizer.pad_token_id, int):
        return int(lm.tokenizer.pad_token_id)
    return min(lm.eos_token_ids, default=0)


@contextmanager
def attention_implementation(lm: LoadedModel, impl: str) -> Iterator[None]:
    """Run the model with another attention implementation, then put back the one it had (baton's)."""
    model = lm.model
    old = model.config._attn_implementation
    if old != impl:
        model.set_attn_implementation(impl)
    try:
        yield
    finally:
        if model.config._attn_implementation != old:
            model.set_attn_implementation(old)


def _wait_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


# ---- the Engine's policies -------------------------------------------------------------------------------
def run_engine(lm: LoadedModel, reqs: list[BenchRequest], max_batch: int, policy: str) -> RunResult:
    from baton.engine.engine import Engine
    from baton.engine.request import Request, SamplingParams

    engine = Engine(lm, policy=policy.removesuffix("-fused"), max_batch=max_batch,
                    fuse_prefill=policy.endswith("-fused"))
    objs = [
        Request(f"r{r.index}", list(r.prompt_ids),
                SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True), arrival_time=0.0)
        for r in reqs
    ]
    for obj in objs:
        engine.validate(obj)
    t0 = time.perf_counter()
    for r, obj in zip(reqs, objs, strict=True):
        obj.arrival_time = t0 + r.arrival_s
        engine.add_request(obj)
    engine.run_until_done()
    results = []
    for r, obj in zip(reqs, objs, strict=True):
        if obj.first_token_time is None or obj.finish_time is None:
            raise RuntimeError(f"{policy}: request {obj.id} did not finish")
        ttft, e2e = obj.first_token_time - obj.arrival_time, obj.finish_time - obj.arrival_time
        n_out = len(obj.output_ids)
        results.append(RequestResult(r.index, r.prompt_len, r.max_new_tokens, n_out, r.arrival_s, ttft, e2e))
    end = max(obj.finish_time for obj in objs if obj.finish_time is not None)
    s = engine.stats
    return RunResult(
        policy=policy,
        requests=results,
        duration_s=end - t0,
        idle_token_rows=s.idle_fraction if s.token_rows else None,
        masked_kv_fraction=s.masked_fraction if s.attended_kv else None,
        splice_ms_mean=1000.0 * s.splice_mean_s if s.splice_mean_s is not None else None,
        stats={
            "steps": s.steps, "token_rows": s.token_rows, "idle_rows": s.idle_rows,
            "attended_kv": s.attended_kv, "masked_kv": s.masked_kv, "splices": s.splices,
            "splice_ms_max": 1000.0 * s.splice_max_s if s.splices else None,
            "prefill_s": s.prefill_s, "decode_s": s.decode_s, "output_tokens": s.output_tokens,
        },
    )


# ---- hf-static: model.generate() in run-to-completion batches --------------------------------------------
class _StepClock:
    """A stopping criterion that never stops: it records when each generation step's tokens exist."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        _sync(self.lm)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def run_hf_static(lm: LoadedModel, reqs: list[BenchRequest], max_batch: int) -> RunResult:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(_StepClock, StoppingCriteria):
        pass

    model: Any = lm.model
    dev, pad = lm.device, _pad_id(lm)
    order = sorted(reqs, key=lambda r: (r.arrival_s, r.index))
    results: dict[int, RequestResult] = {}
    at_return: list[float] = []
    token_rows = idle_rows = attended = useful = batches = 0
    with attention_implementation(lm, "sdpa"):
        t0 = time.perf_counter()
        i = 0
        while i < len(order):
            _wait_until(t0 + order[i].arrival_s)
            now = time.perf_counter() - t0
            batch: list[BenchRequest] = []
            while i < len(order) and len(batch) < max_batch and order[i].arrival_s <= now:
                batch.append(order[i])
                i += 1
            b, width = len(batch), max(r.prompt_len for r in batch)
            ids = torch.full((b, width), pad, dtype=torch.long)
            mask = torch.zeros((b, width), dtype=torch.long)
            for row, r in enumerate(batch):
                ids[row, width - r.prompt_len :] = torch.tensor(r.prompt_ids)
                mask[row, width - r.prompt_len :] = 1
            clock = Clock(lm)
            out = model.generate(
                input_ids=ids.to(dev), attention_mask=mask.to(dev),
                max_new_tokens=max(r.max_new_tokens for r in batch), do_sample=False,
                eos_token_id=None, pad_token_id=pad, use_cache=True,  # eos_token_id=None: EOS ignored
                stopping_criteria=StoppingCriteriaList([clock]),
            )
            _sync(lm)
            returned = time.perf_counter()
            generated = int(out.shape[1]) - width
            if generated != len(clock.times):
                raise RuntimeError(f"hf-static: {generated} tokens but {len(clock.times)} steps timed")
            for r in batch:
                n = min(r.max_new_tokens, generated)
                arrival = t0 + r.arrival_s
                results[r.index] = RequestResult(r.index, r.prompt_len, r.max_new_tokens, n, r.arrival_s,
                                                 clock.times[0] - arrival, clock.times[n - 1] - arrival)
                at_return.append(returned - arrival)
            # What generate() computed, counted as the Engine counts its static policy: the prefill runs
            # b x width rows (padding idle) with causal attention over width keys; each later step runs b
            # rows, one per request, idle once the request has its tokens, attending over the padded cache.
            batches += 1
            prompt_lens = [r.prompt_len for r in batch]
            outs = [min(r.max_new_tokens, generated) for r in batch]
            token_rows += b * width + b * (generated - 1)
            idle_rows += b * width - sum(prompt_lens) + sum(generated - n for n in outs)
            attended += b * width * width + sum(b * (width + k) for k in range(1, generated))
            useful += sum(p * (p + 1) // 2 for p in prompt_lens)
            useful += sum(p + k for p in prompt_lens for k in range(1, generated))
    end = max(t0 + r.arrival_s + res.e2e_s for r in reqs for res in [results[r.index]])
    return RunResult(
        policy="hf-static",
        requests=[results[r.index] for r in reqs],
        duration_s=end - t0,
        idle_token_rows=idle_rows / token_rows if token_rows else None,
        masked_kv_fraction=(attended - useful) / attended if attended else None,
        splice_ms_mean=None,
        stats={
            "batches": batches, "token_rows": token_rows, "idle_rows": idle_rows,
            "attended_kv": attended, "masked_kv": attended - useful,
            "e2e_at_return_s": _summary(at_return),
            "note": "ttft_s/e2e_s: when a request's first/last token was computed (what a streamer would "
                    "see); generate() hands the whole batch back when its longest request is done: "
                    "e2e_at_return_s. idle/masked counts are derived from the padded shapes generate() ran.",
        },
    )


def _summary(xs: list[float]) -> dict[str, float | None]:
    import numpy as np

    if not xs:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    a = np.asarray(xs, dtype=float)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


# ---- hf-cb: transformers' continuous batching -------------------------------------------------------------
@contextmanager
def _quiet_cb_logger() -> Iterator[None]:
    """transformers' continuous batching logs every start and stop at INFO; keep that for --verbose (DEBUG)."""
    log = logging.getLogger("ContinuousBatchingLogger")
    old = log.level
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(old)


def run_hf_cb(lm: LoadedModel, reqs: list[BenchRequest], max_batch: int, page_size: int = 256,
              max_batch_tokens: int = 8192) -> RunResult:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    model: Any = lm.model
    longest = max(r.prompt_len + r.max_new_tokens for r in reqs)
    blocks_per_request = math.ceil(longest / page_size) + 1
    cb_config = ContinuousBatchingConfig(
        page_size=page_size,
        num_blocks=max_batch * blocks_per_request,  # room for max_batch requests of the longest kind
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_batch,
        scheduler_type="fifo",
        seed=0,
    )
    gen_config = GenerationConfig(do_sample=False, max_new_tokens=max(r.max_new_tokens for r in reqs),
                                  eos_token_id=min(lm.eos_token_ids, default=-1), pad_token_id=_pad_id(lm))
    order = sorted(reqs, key=lambda r: (r.arrival_s, r.index))
    done: dict[str, Any] = {}
    setup0 = time.perf_counter()
    with _quiet_cb_logger(), attention_implementation(lm, "sdpa"), model.continuous_batching_context_manager(
        generation_config=gen_config, continuous_batching_config=cb_config, block=True, timeout=30,
        warmup=True,
    ) as manager:
        attn_used = model.config._attn_implementation
        t0 = time.perf_counter()
        setup_s = t0 - setup0
        j = 0
        while len(done) < len(order):
            now = time.perf_counter()
            while j < len(order) and t0 + order[j].arrival_s <= now:
                r = order[j]
                rid = manager.add_request(list(r.prompt_ids), request_id=f"r{r.index}",
                                          max_new_tokens=r.max_new_tokens, record_timestamps=True,
                                          eos_token_id=-1)  # -1: EOS disabled
                if rid is None:
                    raise RuntimeError(f"hf-cb: request r{r.index} was refused")
                j += 1
            next_arrival = t0 + order[j].arrival_s if j < len(order) else math.inf
            wait = max(0.0, min(0.5, next_arrival - time.perf_counter()))
            res = manager.get_result(timeout=wait)
            if res is None:
                if not manager.is_running():
                    raise RuntimeError("hf-cb: the generation thread stopped before all requests finished")
                continue
            if res.is_finished():
                if res.error is not None:
                    raise RuntimeError(f"hf-cb: request {res.request_id} failed: {res.error}")
                done[res.request_id] = res
    results = []
    last = t0
    for r in reqs:
        out = done[f"r{r.index}"]
        stamps = out.timestamps or []
        if not stamps:
            raise RuntimeError(f"hf-cb: request r{r.index} has no token timestamps")
        arrival = t0 + r.arrival_s
        results.append(RequestResult(r.index, r.prompt_len, r.max_new_tokens, len(out.generated_tokens),
                                     r.arrival_s, stamps[0] - arrival, stamps[-1] - arrival))
        last = max(last, stamps[-1])
    return RunResult(
        policy="hf-cb",
        requests=results,
        duration_s=last - t0,
        stats={
            "attn_implementation": attn_used, "page_size": page_size, "num_blocks": cb_config.num_blocks,
            "max_batch_tokens": max_batch_tokens, "max_requests_per_batch": max_batch, "setup_s": setup_s,
            "note": "requests submitted through the continuous-batching manager's add_request (per-request "
                    "max_new_tokens, EOS disabled); manager start-up (setup_s) is not timed; no idle-row or "
                    "masked-KV counters exist for this path.",
        },
    )


Runner = Callable[[LoadedModel, list[BenchRequest], int], RunResult]


def runner(policy: str) -> Runner:
    if policy in ("baton", "baton-fused", "orca", "padded", "static"):
        return lambda lm, reqs, max_batch: run_engine(lm, reqs, max_batch, policy)
    if policy == "hf-static":
        return run_hf_static
    if policy == "hf-cb":
        return run_hf_cb
    raise ValueError(f"policy: unknown {policy!r}, choose from {', '.join(POLICIES)}")


def run_policy(policy: str, lm: LoadedModel, reqs: list[BenchRequest], max_batch: int) -> RunResult:
    return runner(policy)(lm, reqs, max_batch)
