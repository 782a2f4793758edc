"""Open-loop load on a running Baton: when each request is sent, and what the service answered, timed.

A plan is a list of `Planned` requests, each a `BenchRequest` drawn from a named workload (workloads.py) and the
second after the start at which it is sent: Poisson arrivals at a rate, or all at t=0. `run_load` sends every
planned request at its time over the router's gRPC streaming API (token ids in, so the router does not tokenize;
EOS ignored, so each request produces exactly its drawn number of tokens), whatever the service's state: the
arrivals do not wait for earlier answers. Each request is timed on arrival of its streamed chunks:

- TTFT: from sending to the first chunk that carries a token;
- ITL (inter-token latency): the gap between two chunks carrying tokens, divided evenly among the chunk's tokens
  (the router coalesces tokens when its reader falls behind, so a chunk may hold several);
- e2e: from sending to the last chunk.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field

from baton.bench.workloads import BenchRequest
from baton.client import AsyncBatonClient, BatonError

MIN_PROGRESS_INTERVAL_S = 0.2


@dataclass(frozen=True)
class Planned:
    index: int
    request: BenchRequest
    send_at: float  # seconds after the start


@dataclass
class Outcome:
    """What happened to one planned request."""

    index: int
    prompt_len: int
    max_new_tokens: int
    scheduled_s: float  # when it was meant to be sent (seconds after the start)
    sent_s: float = 0.0  # when it was sent
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # a gRPC status name (RESOURCE_EXHAUSTED ...) or an exception's type

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason in ("length", "stop") and self.e2e_s is not None

    def summary(self) -> dict[str, object]:
        return {"index": self.index, "prompt_len": self.prompt_len, "max_new_tokens": self.max_new_tokens,
                "output_tokens": self.output_tokens, "scheduled_s": self.scheduled_s, "sent_s": self.sent_s,
                "ttft_s": self.ttft_s, "e2e_s": self.e2e_s, "finish_reason": self.finish_reason,
                "error": self.error}


def poisson_arrivals(rate: float, seed: int, *, count: int | None = None,
                     duration: float | None = None) -> list[float]:
    """Arrival times of a Poisson process at `rate` requests/s: the first `count`, or all before `duration`
    seconds (whichever ends first when both are given). The same arguments give the same times."""
    if not rate > 0 or math.isinf(rate):
        raise ValueError("rate: must be a finite number > 0 for Poisson arrivals")
    if count is None and duration is None:
        raise ValueError("give a count or a duration")
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while count is None or len(out) < count:
        t += rng.expovariate(rate)
        if duration is not None and t >= duration:
            break
        out.append(t)
    return out


def plan(pool: list[BenchRequest], arrivals: list[float] | None = None) -> list[Planned]:
    """Request i is pool[i % len(pool)] (the pool repeats when more arrive than it holds), sent at arrivals[i];
    without arrivals, the whole pool at t=0. A pool drawn with arrival times (workloads.draw with a rate) keeps
    its own: pass arrivals=[r.arrival_s for r in pool]."""
    if not pool:
        raise ValueError("empty request pool")
    if arrivals is None:
        return [Planned(i, r, 0.0) for i, r in enumerate(pool)]
    return [Planned(i, pool[i % len(pool)], t) for i, t in enumerate(arrivals)]


async def _one(client: AsyncBatonClient, p: Planned, start: float, out: Outcome) -> None:
    delay = start + p.send_at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.perf_counter()
    out.sent_s = sent - start
    last: float | None = None
    try:
        async for chunk in client.stream(list(p.request.prompt_ids), max_new_tokens=p.request.max_new_tokens,
                                         ignore_eos=True):
            now = time.perf_counter()
            n = len(chunk.token_ids)
            if n:
                if last is None:
                    out.ttft_s = now - sent
                else:
                    out.itl_s.extend([(now - last) / n] * n)
                last = now
                out.output_tokens += n
            if chunk.finish_reason is not None:
                out.finish_reason = chunk.finish_reason
                out.e2e_s = now - sent
        if out.finish_reason is None:
            out.error = "NO_FINISH"  # the stream ended without a finish reason
        elif out.finish_reason == "cancelled":
            out.error = "CANCELLED"
    except BatonError as e:
        out.error = e.code.name
    except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop at the first
        out.error = type(e).__name__


async def run_load(address: str, planned: list[Planned], request_timeout_s: float | None = None,
                   progress: bool = False, desc: str = "", api_key: str | None = None) -> tuple[list[Outcome], float]:
    """Send every planned request at its time; wait for all to end. Returns each one's outcome (in plan order)
    and the seconds from the start to the end of the last one."""
    from tqdm import tqdm

    outcomes = [Outcome(p.index, p.request.prompt_len, p.request.max_new_tokens, p.send_at) for p in planned]
    bar = tqdm(total=len(planned), unit="req", desc=desc, disable=not progress, dynamic_ncols=True,
               mininterval=MIN_PROGRESS_INTERVAL_S)
    failed = 0

    def done(out: Outcome) -> None:
        nonlocal failed
        failed += 0 if out.ok else 1
        bar.set_postfix(failed=failed, refresh=False)
        bar.update(1)

    async with AsyncBatonClient(address, timeout=request_timeout_s, api_key=api_key) as client:
        start = time.perf_counter()

        async def one(p: Planned, out: Outcome) -> None:
            await _one(client, p, start, out)
            done(out)

        await asyncio.gather(*(one(p, o) for p, o in zip(planned, outcomes)))
        elapsed = time.perf_counter() - start
    bar.close()
    return outcomes, elapsed


async def warm_up(address: str, pool: list[BenchRequest], timeout_s: float = 120.0, api_key: str | None = None) -> None:
    """Two short requests, one after the other, untimed: the service's first requests pay one-off costs."""
    prompt = list(pool[0].prompt_ids[:8])
    async with AsyncBatonClient(address, timeout=timeout_s, api_key=api_key) as client:
        for _ in range(2):
            await client.generate(prompt, max_new_tokens=2, ignore_eos=True)
