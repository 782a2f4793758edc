"""The decode worker's core, free of any transport: reservations, KV intake, the decode loop and occupancy.

Two sides meet here. The asyncio side (the gRPC handlers) reserves rows, hands in KV payloads, cancels and
reads occupancy; all of the worker's bookkeeping lives on that side and is only touched from the event loop.
The decode loop runs the Engine in one dedicated thread: each iteration it first applies the commands waiting
in its inbox (splice a request, cancel one), then runs one engine step, then hands the sampled tokens back to
the event loop. Network I/O never runs on the loop thread, so a slow KV push never stalls an iteration, and
the engine is only ever touched from the loop thread.

A request's life on this worker:  reserve() -> RESERVED  --deliver_kv()-->  QUEUED  --first token-->  RUNNING
--finished or cancelled--> gone. A reservation whose KV does not arrive within its lease is dropped. A request
reserved with prefill_here (a short prompt, as the router decides) skips RESERVED: it is QUEUED at once, and the
engine runs its prompt inside the batch's next iteration (Engine fuse_prefill), so nothing travels.

A request with n choices (n > 1) holds n rows: its one KV payload is spliced into all of them (Engine.add_prefilled's
forks), choice i an engine request of its own (id `<id>/<i>`, seed choice_seed(seed, i)); its stream carries each
choice's tokens by index and ends after the last choice's finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import queue
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

import torch

from baton.engine.engine import Engine, StepOutput
from baton.engine.kv_payload import KVPayload
from baton.engine.logprobs import TokenLogprobs
from baton.engine.models import LoadedModel
from baton.engine.prefix_cache import PrefixCache
from baton.engine.request import FinishReason, Request
from baton.engine.sampler import check_choices, choice_seed
from baton.engine.slab_pool import default_reserve
from baton.errors import (
    InvalidRequestError,
    KvLeaseExpired,
    NotFound,
    Overloaded,
    PayloadError,
    PrefixEvicted,
    ServiceError,
    Unavailable,
)
from baton.metrics import DecodeMetrics
from baton.rpc.load import DecodeLoad, Role
from baton.rpc.main_thread import Spawn, Started, in_new_thread
from baton.shared_cores import SharedCores

log = logging.getLogger(__name__)

DEFAULT_KV_TIMEOUT_S = 30.0
MAX_KV_TIMEOUT_S = 120.0  # the longest KV lease: a reservation never holds a row longer, whatever its caller asks


class SlotState(enum.Enum):
    RESERVED = "reserved"  # a row is promised; the KV has not arrived yet
    QUEUED = "queued"  # KV received, waiting for the decode loop to splice it in
    RUNNING = "running"  # a row of the decode batch, producing tokens


@dataclass
class DecodeEvent:
    """New tokens of one request; the last event of a request carries its finish reason."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    stop_text: str | None = None  # the output text before the stop string, when one ended the request
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when the request asks
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on the event of the first token, when asked
    index: int = 0  # the choice (n > 1)

    def then(self, nxt: DecodeEvent) -> DecodeEvent:
        """This event and the next one (of the same choice) as one."""
        return DecodeEvent(self.token_ids + nxt.token_ids, nxt.finish_reason, nxt.stop_text,
                           self.logprobs + nxt.logprobs, self.prompt_logprobs or nxt.prompt_logprobs, self.index)

    def without_first(self) -> DecodeEvent:
        """Less its first token (streamed already, with the prompt's logprobs: announce_first_token)."""
        return DecodeEvent(self.token_ids[1:], self.finish_reason, self.stop_text, self.logprobs[1:],
                           index=self.index)


class Reservation:
    """A live request on this worker, as its caller sees it: the events to stream, and a way to cancel it."""

    def __init__(self, worker: DecodeWorker, request: Request, kv_budget: int, n: int = 1) -> None:
        self.worker, self.request, self.kv_budget = worker, request, kv_budget
        # choice i's engine request (choice 0: the request itself)
        self.choices = [request] + [Request(f"{request.id}/{i}", request.prompt_ids,
                                            replace(request.params, seed=choice_seed(request.params.seed, i)))
                                    for i in range(1, n)]
        self.open = set(range(n))  # choices not finished
        self.state = SlotState.RESERVED
        self.reserved_at = time.perf_counter()
        self.kv_at: float | None = None
        self.lease: asyncio.TimerHandle | None = None
        self.ended = False
        self.early_token: int | None = None  # the first token, streamed when the KV came (see deliver_kv)
        self._events: asyncio.Queue[DecodeEvent | Exception] = asyncio.Queue()

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def rows(self) -> int:
        return len(self.choices)

    async def events(self) -> AsyncIterator[DecodeEvent]:
        """New tokens as they are sampled (several coalesced when the reader falls behind), ending with the event
        that carries the finish reason. Raises the error that ended the request, if one did."""
        open_choices = len(self.choices)
        pending: DecodeEvent | Exception | None = None
        while True:
            item = pending if pending is not None else await self._events.get()
            pending = None
            if isinstance(item, Exception):
                raise item
            while item.finish_reason is None and not self._events.empty():
                nxt = self._events.get_nowait()
                if isinstance(nxt, Exception) or nxt.index != item.index:
                    pending = nxt
                    break
                item = item.then(nxt)
            yield item
            if item.finish_reason is not None:
                open_choices -= 1
                if open_choices == 0 or item.finish_reason is FinishReason.CANCELLED:
                    return

    def cancel(self) -> bool:
        """Cancel this request wherever it is; False when it had already ended."""
        return self.worker._cancel(self)

    def _push(self, item: DecodeEvent | Exception) -> None:
        self._events.put_nowait(item)


# Commands from the event loop to the decode loop.
@dataclass
class _Add:
    request: Request
    payload: KVPayload | None  # None: the engine prefills the request itself (prefill_here)
    forks: list[Request] = field(default_factory=list)  # its other choices, spliced from the same payload


@dataclass
class _Cancel:
    request_id: str


@dataclass
class _Stop:
    pass


@dataclass
class _Iteration:
    """What one iteration of the decode loop hands back to the event loop."""

    events: list[tuple[Request, DecodeEvent]] = field(default_factory=list)
    failed: list[tuple[Request, Exception]] = field(default_factory=list)
    kv_tokens: int = 0
    tokens_generated: int = 0
    prefix_blocks: tuple[str, ...] | None = None  # the prefix cache's block keys, when they changed


class DecodeWorker:
    """A decode worker's core, as the worker frame (baton/rpc/worker_frame.py) runs it."""

    role = Role.DECODE
    keeps_registered_while_draining = True  # its load shows no free row: routers keep streaming from it

    def __init__(
        self,
        lm: LoadedModel,
        policy: str = "baton",
        max_batch: int = 32,
        max_kv_tokens: int | None = None,
        default_kv_timeout_s: float = DEFAULT_KV_TIMEOUT_S,
        shared_cores: SharedCores | None = None,
        max_kv_timeout_s: float = MAX_KV_TIMEOUT_S,
        spawn: Spawn = in_new_thread,
        prefix_cache_bytes: int = 0,
        kv_reserve_bytes: int | None = None,
    ) -> None:
        """kv_reserve_bytes: slab memory laid out at start on a CPU (None: slab_pool.default_reserve)."""
        self.lm = lm
        self._spawn = spawn  # where the decode loop runs: the main thread in a worker process (main_thread.py)
        self.shared_cores = shared_cores  # when set, each step waits its turn on the cores (prefills go first)
        # the prompts the router sends here to prefill (prefill_here) run inside the batch's iteration
        # with a prefix cache (prefix_cache.py), those prompts start from earlier prompts' and finished requests' KV
        cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.max_batch = max_batch
        self.max_kv_tokens = max_kv_tokens or lm.spec.batch_kv_tokens(max_batch)
        # the slabs' memory is laid out now, not at the steps that first need it (slab_pool.py)
        if kv_reserve_bytes is None:
            kv_reserve_bytes = default_reserve(self.max_kv_tokens, lm.kv_bytes_per_token())
        self.engine = Engine(lm, policy=policy, max_batch=max_batch, fuse_prefill=True, prefix_cache=cache,
                             kv_reserve_bytes=kv_reserve_bytes)
        if shared_cores is not None:
            self.engine.layer_hook = shared_cores.yield_to_prefill
        self.default_kv_timeout_s = min(default_kv_timeout_s, max_kv_timeout_s)
        self.max_kv_timeout_s = max_kv_timeout_s
        self.draining = False
        self.metrics = DecodeMetrics()
        # event-loop side
        self._live: dict[str, Reservation] = {}
        self._choice: dict[str, tuple[Reservation, int]] = {}  # every live engine request id -> its choice
        self._completed = self._kv_received = self._tokens_generated = 0
        self._batch_kv_tokens = 0  # as last reported by the decode loop
        self._prefix_blocks: tuple[str, ...] = ()  # likewise: what the prefix cache holds, for routers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None
        # set when what routers choose by changes (rows, KV budget, waiting, cached blocks): the worker frame
        # publishes the load to the registry soon, not a heartbeat later, so that routers sharing the registry see
        # one another's assignments and its cached prefixes; each step's token counts alone do not set it
        self.load_changed = asyncio.Event()
        self._routed: tuple[tuple[int, int, int, int], tuple[str, ...]] | None = None  # as last set
        # decode-loop side
        self._inbox: queue.SimpleQueue[_Add | _Cancel | _Stop] = queue.SimpleQueue()
        self._thread: Started | None = None

    @property
    def fingerprint(self) -> str:
        return self.lm.fingerprint

    def describe(self) -> str:
        return f"policy {self.engine.policy.value}, {self.max_batch} rows, {self.max_kv_tokens} KV tokens"

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the decode loop. Call from the event loop that will call every other method."""
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        threads = torch.get_num_threads()  # a new thread does not always inherit torch.set_num_threads
        self._thread = self._spawn(lambda: self._run(threads), "decode-loop")
        self._publish()

    async def drain(self) -> None:
        """Stop taking reservations (occupancy then reports no free row) and wait until every live request has
        ended."""
        self.draining = True
        self._publish()
        assert self._idle is not None, "start() first"
        await self._idle.wait()

    def hand_off(self) -> int:
        """End every live request with UNAVAILABLE, freeing its row, so that its router resumes it on another
        worker from the tokens it already streamed (the end of a drain that ran out of time). Returns how many."""
        live = [res for res in self._live.values() if not res.ended]
        for res in live:
            self._cancel(res, Unavailable("decode worker is shutting down: request handed off to another worker"))
        return len(live)

    async def close(self) -> None:
        """Stop the decode loop (live requests are cancelled)."""
        for res in list(self._live.values()):
            res.cancel()
        if self._thread is not None:
            self._inbox.put(_Stop())
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    # ---- the event-loop side ---------------------------------------------------------------------------
    def reserve(self, request: Request, kv_timeout_s: float | None = None, prefill_here: bool = False,
                n: int = 1) -> Reservation:
        """Promise a row (n rows, for n choices) and KV room to a request whose KV will come through deliver_kv
        within the lease, or, with prefill_here, that this worker prefills itself (queued at once, no lease).
        Raises InvalidRequestError (cannot be served here at all), Overloaded (full now) or Unavailable."""
        if self.draining:
            raise Unavailable("decode worker is draining: it takes no new requests")
        if not request.id:
            raise InvalidRequestError("request_id", "required")
        if request.id in self._live:
            raise InvalidRequestError("request_id", f"request id {request.id!r} is already live on this worker")
        self.engine.validate(request)  # reads only the model's limits: safe outside the decode loop
        check_choices(n)
        if n > 1 and (prefill_here or request.output_ids or not self.engine.policy.splices_prefilled_kv):
            raise InvalidRequestError("n", "several choices come from a pushed prefill, new, under the baton policy")
        budget = n * (request.prompt_len + request.params.max_new_tokens)
        if budget > self.max_kv_tokens:
            raise InvalidRequestError(
                "max_new_tokens",
                f"prompt + max_new_tokens ({budget} tokens) exceeds this worker's KV budget of {self.max_kv_tokens}",
            )
        occ = self.occupancy()
        if n > self.max_batch:
            raise InvalidRequestError("n", f"{n} choices cannot fit this worker's {self.max_batch} rows")
        if occ.free_rows < n:
            raise Overloaded(f"decode worker is full: {occ.free_rows} of {self.max_batch} rows free, {n} asked",
                             retry_after_s=0.1)
        if budget > occ.kv_tokens_free:
            raise Overloaded(
                f"decode worker's KV budget is taken: {budget} tokens asked, {occ.kv_tokens_free} free",
                retry_after_s=0.1,
            )
        assert self._loop is not None and self._idle is not None, "start() first"
        res = Reservation(self, request, budget, n)
        for choice in res.choices[1:]:
            self.engine.validate(choice)
        self._live[request.id] = res
        for i, choice in enumerate(res.choices):
            self._choice[choice.id] = (res, i)
        self._idle.clear()
        if prefill_here:
            res.state, res.kv_at = SlotState.QUEUED, time.perf_counter()
            self.metrics.local_prefills.inc()
            self.metrics.local_prefill_tokens.inc(len(request.all_ids))
            self._inbox.put(_Add(request, None))
        else:
            timeout = kv_timeout_s if kv_timeout_s and kv_timeout_s > 0 else self.default_kv_timeout_s
            timeout = min(timeout, self.max_kv_timeout_s)  # a caller cannot hold a row longer, whatever it asks
            res.lease = self._loop.call_later(timeout, self._expire, res, timeout)
        self._publish()
        return res

    def deliver_kv(self, payload: KVPayload) -> None:
        """Hand in a reserved request's KV; it joins the batch at the next iteration boundary.
        Raises NotFound (no reservation), PayloadError (KV this worker cannot use) or PrefixEvicted (it leaves
        out blocks this worker's cache no longer holds); the reservation stays."""
        res = self.expect_kv(payload.request_id, payload.model_fingerprint, payload.dims, payload.prompt_ids,
                             payload.first_token, payload.held_tokens)
        payload = self._complete(payload)
        self.announce_first_token(res, payload.first_token, payload.first_logprobs,
                                  payload.prompt_logprobs)  # if its push's header has not already
        if res.lease is not None:
            res.lease.cancel()
        res.state, res.kv_at = SlotState.QUEUED, time.perf_counter()
        self._kv_received += 1
        self._inbox.put(_Add(res.request, payload, res.choices[1:]))
        self.metrics.kv_wait.observe(res.kv_at - res.reserved_at)
        self._publish()

    def _complete(self, payload: KVPayload) -> KVPayload:
        """The whole payload: the tokens a push left out (held_tokens) taken from this worker's prefix cache, at
        once and under its lock, so that nothing evicts them between this check and the splice. Raises
        PrefixEvicted when the cache no longer holds them all (nothing spliced; the pusher sends the whole KV)."""
        if not payload.held_tokens:
            return payload
        cache = self.engine.runner.prefix_cache
        held = cache.held(payload.prompt_ids, payload.held_tokens) if cache is not None else None
        if held is None:
            raise self._evicted(payload.request_id, payload.held_tokens)
        self.metrics.kv_held_bytes.inc(held.numel() * held.element_size())
        return payload.with_held(held)

    def _evicted(self, request_id: str, held_tokens: int) -> PrefixEvicted:
        self.metrics.kv_held_evicted.inc()
        return PrefixEvicted(f"request {request_id!r}: its KV push leaves out the first {held_tokens} tokens, which "
                             "this decode worker's prefix cache does not hold (any more); push the whole KV")

    def announce_first_token(self, res: Reservation, token: int, lp: TokenLogprobs | None = None,
                             prompt_lps: list[TokenLogprobs | None] | None = None) -> None:
        """Stream a reserved request's first token now, as its KV push announces it (header first, bytes after):
        under baton the prefill sampled it already, so the client need not wait for the KV bytes, the next
        iteration boundary and a step (time to first token). The engine emits it again at the splice; _on_report
        drops that copy. A token that could end the request waits for the engine, which decides the end. Should
        the push fail after this, the router resumes the request from this token elsewhere
        (services/router/attempt.py)."""
        if (res.state is not SlotState.RESERVED or res.early_token is not None or res.rows > 1
                or not self.engine.policy.splices_prefilled_kv or self.engine.may_end(res.request, token)):
            return
        res.early_token = token
        res._push(DecodeEvent([token], logprobs=[lp] if lp is not None else [], prompt_logprobs=prompt_lps))

    def expect_kv(
        self, request_id: str, fingerprint: str, dims: tuple[int, int, int], token_ids: list[int], first_token: int,
        held_tokens: int = 0,
    ) -> Reservation:
        """The reservation waiting for a KV payload so described (from its header, before its bytes arrive, and
        again when they have: it may have ended meanwhile): dims are (layers, kv_heads, head_dim); `held_tokens`
        leading tokens the payload leaves out, for this worker's prefix cache to give. Raises NotFound (no
        reservation), PayloadError (KV this worker cannot use for it, ModelSpec.check_kv) or PrefixEvicted (the
        cache does not hold those tokens)."""
        res = self._live.get(request_id)
        if res is None:
            raise NotFound(f"no reservation for request {request_id!r} on this worker (expired or cancelled?)")
        if res.state is not SlotState.RESERVED:
            raise PayloadError(f"KV for request {request_id!r} was already received")
        self.lm.spec.check_kv(fingerprint, self.lm.fingerprint, dims, token_ids, res.request.all_ids, first_token)
        cache = self.engine.runner.prefix_cache
        if held_tokens and (cache is None or not cache.holds(token_ids, held_tokens)):
            raise self._evicted(request_id, held_tokens)
        return res

    def cancel(self, request_id: str) -> bool:
        """Cancel a live request wherever it is; False when no such request is live."""
        res = self._live.get(request_id)
        return res is not None and res.cancel()

    def occupancy(self) -> DecodeLoad:
        live = self._live.values()
        waiting = [r for r in live if r.state is not SlotState.RUNNING]
        promised = sum(r.kv_budget for r in live)
        queued_kv = sum(r.rows * r.request.num_tokens for r in live if r.state is SlotState.QUEUED)
        taken = sum(r.rows for r in live)
        rows = 0 if self.draining else max(0, self.max_batch - taken)  # a draining worker takes nothing
        return DecodeLoad(
            active_rows=taken,
            free_rows=rows,
            kv_tokens_used=self._batch_kv_tokens + queued_kv,
            kv_tokens_free=0 if self.draining else max(0, self.max_kv_tokens - promised),
            waiting=len(waiting),
            completed=self._completed,
            kv_received=self._kv_received,
            tokens_generated=self._tokens_generated,
            prefix_blocks=self._prefix_blocks,
        )

    def _publish(self) -> None:
        """The occupancy gauges of the metrics, after every change (on the event loop, where occupancy lives);
        the registry record soon after where what routers choose by changed (load_changed)."""
        o = self.occupancy()
        counts = (o.active_rows, o.free_rows, o.kv_tokens_free, o.waiting)
        if self._routed is None or counts != self._routed[0] or self._prefix_blocks is not self._routed[1]:
            self._routed = (counts, self._prefix_blocks)  # the blocks: a new tuple whenever the cache changed
            self.load_changed.set()
        reserved = sum(1 for r in self._live.values() if r.state is SlotState.RESERVED)
        promised = sum(r.kv_budget for r in self._live.values())
        self.metrics.occupancy(o.active_rows - o.waiting, o.waiting, reserved, o.free_rows, o.kv_tokens_used,
                               max(0, promised - o.kv_tokens_used), o.kv_tokens_free)

    def _cancel(self, res: Reservation, error: Exception | None = None) -> bool:
        """Drop a live request; its stream ends CANCELLED, or with `error` (a hand-off)."""
        if res.ended or self._live.get(res.id) is not res:
            return False
        if res.state is SlotState.RESERVED:
            for choice in res.choices:
                choice.finish(FinishReason.CANCELLED)
        else:
            for i in sorted(res.open):
                self._inbox.put(_Cancel(res.choices[i].id))  # the decode loop frees the row before its next step
        if error is None:
            self._end(res, DecodeEvent([], FinishReason.CANCELLED), "cancelled")
        else:
            self._end(res, error, "handed_off")
        return True

    def _expire(self, res: Reservation, timeout: float) -> None:
        if res.ended or res.state is not SlotState.RESERVED:
            return
        msg = f"request {res.id!r}: no KV arrived within {timeout:g}s; its reserved row was released"
        self._end(res, KvLeaseExpired(msg), "expired")

    def _on_report(self, report: _Iteration) -> None:
        """Runs on the event loop: deliver one iteration's tokens and endings."""
        self._batch_kv_tokens, self._tokens_generated = report.kv_tokens, report.tokens_generated
        if report.prefix_blocks is not None:
            self._prefix_blocks = report.prefix_blocks
        for req, ev in report.events:
            res, ev.index = self._choice.get(req.id, (None, 0))
            if res is None or res.choices[ev.index] is not req or res.ended:
                continue  # cancelled meanwhile
            if res.state is not SlotState.RUNNING:  # its first event: with the prompt's logprobs, when asked
                if res.kv_at is not None:
                    self.metrics.queue.observe(time.perf_counter() - res.kv_at)
                ev.prompt_logprobs = req.prompt_logprobs
            res.state = SlotState.RUNNING
            if res.early_token is not None:  # streamed when its KV came
                assert ev.token_ids[:1] == [res.early_token], "the engine's first token is the prefill's"
                ev, res.early_token = ev.without_first(), None
                if not ev.token_ids and ev.finish_reason is None:
                    continue
            if ev.finish_reason is None:
                res._push(ev)
                continue
            res.open.discard(ev.index)
            if res.open:  # other choices go on
                res._push(ev)
            else:
                self._completed += 1
                self._end(res, ev, ev.finish_reason.value)
        for req, exc in report.failed:
            res, i = self._choice.get(req.id, (None, 0))
            if res is not None and res.choices[i] is req and not res.ended:
                self._end(res, exc, "failed")
        self._publish()

    def _end(self, res: Reservation, last: DecodeEvent | Exception, outcome: str) -> None:
        res.ended = True
        if res.lease is not None:
            res.lease.cancel()
        del self._live[res.id]
        for choice in res.choices:
            self._choice.pop(choice.id, None)
        res._push(last)
        now = time.perf_counter()
        kv_wait = f"{res.kv_at - res.reserved_at:.3f}s" if res.kv_at is not None else "-"
        log.info(
            "request %s %s: prompt %d tokens, output %d tokens, kv wait %s, total %.3fs%s",
            res.id, outcome, res.request.prompt_len, len(res.request.output_ids), kv_wait, now - res.reserved_at,
            f" ({last})" if isinstance(last, Exception) else "",
            extra={"request_id": res.id},
        )
        self.metrics.requests.labels(outcome=outcome).inc()
        self._publish()
        if not self._live and self._idle is not None:
            self._idle.set()

    # ---- the decode loop (its own thread) --------------------------------------------------------------
    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        engine = self.engine
        cache, published = engine.runner.prefix_cache, -1
        while True:
            commands = [self._inbox.get()] if not engine.has_work() else []  # nothing to compute: sleep here
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            report = _Iteration()
            if any(isinstance(c, _Stop) for c in commands):
                return
            for cmd in commands:
                self._apply(cmd, report)
            if engine.has_work():
                self._step(report)
            report.kv_tokens = engine.batch.kv_tokens
            report.tokens_generated = engine.stats.output_tokens
            if cache is not None and cache.version != published:  # read here: the cache is this thread's
                report.prefix_blocks, published = cache.keys(), cache.version
            self.metrics.engine(engine.stats)
            self.metrics.slab_bytes.set(engine.batch.allocated_bytes)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._on_report, report)

    def _apply(self, cmd: _Add | _Cancel | _Stop, report: _Iteration) -> None:
        engine = self.engine
        if isinstance(cmd, _Cancel):
            try:
                engine.cancel(cmd.request_id)
            except Exception:  # noqa: BLE001 - the request is gone for its caller already; keep the loop alive
                log.exception("cancelling request %s failed", cmd.request_id)
        elif isinstance(cmd, _Add):
            try:
                if cmd.payload is not None and engine.policy.splices_prefilled_kv:
                    engine.add_prefilled(cmd.request, cmd.payload, cmd.forks)
                else:  # prefill_here, or orca, padded and static, which cannot splice KV: prefill locally
                    cmd.request.arrival_time = time.perf_counter()
                    engine.add_request(cmd.request)
            except Exception as e:  # noqa: BLE001 - checked before queueing; reaching here is a bug, not a crash
                log.exception("request %s could not be queued", cmd.request.id)
                report.failed.extend((r, e) for r in [cmd.request, *cmd.forks])

    def _step(self, report: _Iteration) -> None:
        engine = self.engine
        # a step adds no request, but one that fails midway may hold some only in its own locals: fail all of these
        everyone = engine.held()
        try:
            with self.shared_cores.decode_step() if self.shared_cores else contextlib.nullcontext():
                out: StepOutput = engine.step()
        except Exception as e:  # noqa: BLE001 - fail what the engine held, keep serving
            log.exception("decode step failed")
            engine.forks.clear()
            err = ServiceError(f"decode step failed: {type(e).__name__}: {e}")
            for req in everyone:
                try:
                    engine.cancel(req.id)
                except Exception:  # noqa: BLE001
                    log.exception("could not drop request %s", req.id)
                report.failed.append((req, err))
            return
        by_request: dict[int, tuple[Request, DecodeEvent]] = {}
        for req, tok in out.tokens:
            by_request.setdefault(id(req), (req, DecodeEvent([])))[1].token_ids.append(tok)
        for req, ev in by_request.values():
            if req.params.logprobs is not None:  # the step's tokens are the request's last ones
                ev.logprobs = req.logprobs[len(req.logprobs) - len(ev.token_ids):]
        for req in out.finished:
            ev = by_request.setdefault(id(req), (req, DecodeEvent([])))[1]
            ev.finish_reason, ev.stop_text = req.finish_reason, req.stop_text
        report.events = list(by_request.values())
