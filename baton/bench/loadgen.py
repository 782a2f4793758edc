"""Open-loop load on a running service: when each request is sent, and what the service answered, timed.

A plan is a list of `Planned` requests, each a `BenchRequest` drawn from a named workload (workloads.py) and the
second after the start at which it is sent: Poisson arrivals at a rate, or all at t=0. `run_load` sends every
planned request at its time to a `Target` (token ids in, so the service does not tokenize; EOS ignored, so each
request produces exactly its drawn number of tokens), whatever the service's state: the arrivals do not wait for
earlier answers. The target is Baton's router over its gRPC streaming API (here), or any OpenAI-compatible
server over streaming /v1/completions (openai_load.py, timed the same way as far as its stream allows: see
there). Each request is timed on arrival of its streamed chunks:

- TTFT: from sending to the first chunk that carries a token;
- ITL (inter-token latency): the gap between two chunks carrying tokens, divided evenly among the chunk's tokens
  (the router coalesces tokens when its reader falls behind, so a chunk may hold several);
- e2e: from sending to the last chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

from baton.bench.workloads import BenchRequest, Conversation
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
    error: str | None = None  # a gRPC status name (RESOURCE_EXHAUSTED ...), HTTP_<status>, or an exception's type
    detail: str | None = None  # what the error said (not in the results: the first of each kind is printed)
    output_ids: list[int] = field(default_factory=list)  # the answer's tokens, where the API gives them (grpc)
    conversation: int | None = None  # chat: the conversation this turn belongs to

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


class LoadError(Exception):
    """A service that cannot be benchmarked (unreachable, failing its warm-up, no model to name): the message
    says why."""


@dataclass(frozen=True)
class Target:
    """Where the load goes."""

    api: str  # "grpc": Baton's router; "openai": an OpenAI-compatible server
    url: str  # grpc: host:port; openai: the base URL without /v1 (http://host:port)
    api_key: str | None = None  # sent as `authorization: Bearer`
    model: str | None = None  # openai: the model name each request sends


class Sender(Protocol):
    async def send(self, request: BenchRequest, out: Outcome, sent: float) -> None:
        """Send `request` now (`sent` is time.perf_counter() at sending) and fill in `out` from its stream;
        errors of the service are recorded in `out`, anything else may be raised."""
        ...


class GrpcSender:
    """Sends benchmark requests over the router's gRPC streaming API; given several routers, each request goes to
    the next one (so a conversation's turns land on every router, as behind a load balancer)."""

    def __init__(self, clients: list[AsyncBatonClient]) -> None:
        self.clients = itertools.cycle(clients)

    async def send(self, request: BenchRequest, out: Outcome, sent: float) -> None:
        last: float | None = None
        try:
            client = next(self.clients)
            async for chunk in client.stream(list(request.prompt_ids), max_new_tokens=request.max_new_tokens,
                                             ignore_eos=True):
                now = time.perf_counter()
                n = len(chunk.token_ids)
                out.output_ids.extend(chunk.token_ids)
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
                out.error, out.detail = "NO_FINISH", "the stream ended without a finish reason"
            elif out.finish_reason == "cancelled":
                out.error, out.detail = "CANCELLED", "the service ended the request (finish_reason 'cancelled')"
        except BatonError as e:
            out.error, out.detail = e.code.name, e.message


# Opens a sender for up to `concurrency` requests at once, each allowed `timeout_s` seconds (the caller picks the
# API: serve_bench.connect).
Connect = Callable[[float | None, int], AbstractAsyncContextManager[Sender]]


@asynccontextmanager
async def grpc_connect(target: Target, timeout_s: float | None, concurrency: int) -> AsyncIterator[Sender]:
    """A sender over Baton's gRPC API (one channel per router multiplexes any number of streams: `concurrency` is
    moot); target.url may name several routers, comma-separated."""
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(AsyncBatonClient(url, timeout=timeout_s, api_key=target.api_key))
                   for url in target.url.split(",")]
        yield GrpcSender(clients)


async def _one(sender: Sender, p: Planned, start: float, out: Outcome) -> None:
    delay = start + p.send_at - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    sent = time.perf_counter()
    out.sent_s = sent - start
    try:
        await sender.send(p.request, out, sent)
    except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop at the first
        out.error, out.detail = type(e).__name__, str(e) or type(e).__name__


async def run_load(connect: Connect, planned: list[Planned], request_timeout_s: float | None = None,
                   progress: bool = False, desc: str = "") -> tuple[list[Outcome], float]:
    """Send every planned request at its time through a sender from `connect`; wait for all to end. Returns each
    one's outcome (in plan order) and the seconds from the start to the end of the last one."""
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

    # open loop: as many connections as requests could ever be in flight, so that none waits for one
    async with connect(request_timeout_s, len(planned)) as sender:
        start = time.perf_counter()

        async def one(p: Planned, out: Outcome) -> None:
            await _one(sender, p, start, out)
            done(out)

        await asyncio.gather(*(one(p, o) for p, o in zip(planned, outcomes)))
        elapsed = time.perf_counter() - start
    bar.close()
    return outcomes, elapsed


async def run_conversations(connect: Connect, conversations: list[Conversation],
                            request_timeout_s: float | None = None, progress: bool = False,
                            desc: str = "") -> tuple[list[Outcome], float]:
    """Closed-loop conversations: each starts at its arrival time and sends its turns one after another, each
    turn's prompt the conversation so far (system prompt, earlier user turns and the answers the service gave,
    token for token) and the new user turn. Returns every turn's outcome (conversation by conversation) and the
    seconds until the last answer ended. A failed turn ends its conversation."""
    from tqdm import tqdm

    turns = sum(len(c.turns) for c in conversations)
    bar = tqdm(total=turns, unit="turn", desc=desc, disable=not progress, dynamic_ncols=True,
               mininterval=MIN_PROGRESS_INTERVAL_S)
    outcomes: list[list[Outcome]] = [[] for _ in conversations]
    index = itertools.count()
    async with connect(request_timeout_s, len(conversations)) as sender:
        start = time.perf_counter()

        async def talk(c: Conversation) -> None:
            delay = start + c.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            history = list(c.system)
            for user, answer in c.turns:
                prompt = history + list(user)
                i = next(index)
                out = Outcome(i, len(prompt), answer, time.perf_counter() - start, conversation=c.index)
                outcomes[c.index].append(out)
                await _one(sender, Planned(i, BenchRequest(i, tuple(prompt), answer, 0.0),
                                           out.scheduled_s), start, out)
                bar.update(1)
                if not out.ok or len(out.output_ids) != out.output_tokens:
                    if out.ok:
                        out.error, out.detail = "NO_TOKEN_IDS", "the API did not give the answer's token ids"
                    return
                history = prompt + out.output_ids

        await asyncio.gather(*(talk(c) for c in conversations))
        elapsed = time.perf_counter() - start
    bar.close()
    return [o for per in outcomes for o in per], elapsed


async def warm_up(connect: Connect, pool: list[BenchRequest], timeout_s: float = 120.0) -> None:
    """Two short streamed requests, one after the other, untimed: the service's first requests pay one-off
    costs. LoadError when either fails (with the service's word for why)."""
    request = BenchRequest(0, pool[0].prompt_ids[:8], 2, 0.0)
    async with connect(timeout_s, 1) as sender:
        for _ in range(2):
            out = Outcome(0, request.prompt_len, request.max_new_tokens, 0.0)
            await _one(sender, Planned(0, request, 0.0), time.perf_counter(), out)
            if not out.ok:
                raise LoadError(f"{out.error or 'INCOMPLETE'}: {out.detail or 'no finish'}")
