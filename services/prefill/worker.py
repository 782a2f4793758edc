"""The prefill worker's core: a queue of prompts, one compute thread that prefills them, and the push of each
result's KV to its decode worker (services/prefill/shipper.py).

Requests are submitted from an asyncio event loop and wait in a visible queue. The compute thread (the only
thread that runs torch) takes every waiting request at each iteration, as one batch, and prefills it in runs
packed end to end without padding (`ModelRunner.prefill_many`, up to PREFILL_TOKEN_BUDGET tokens per forward
pass); each result comes back to the submitter's event loop as the result of an asyncio future. So the gRPC
side never blocks on a forward pass, and the queue shows how far behind the worker is.

Cancelling drops a queued request at once; a request whose prefill is already running is dropped when the
compute ends, and its KV is never handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from baton.engine.kv_payload import KVPayload
from baton.engine.models import LoadedModel
from baton.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from baton.engine.request import Request
from baton.engine.runner import ModelRunner, pack_for_prefill
from baton.errors import Cancelled, InvalidRequestError, KvPushFailed, Overloaded, Reason, Unavailable
from baton.metrics import PrefillMetrics
from baton.rpc.load import PrefillLoad, Role
from baton.rpc.main_thread import Spawn, in_new_thread
from baton.rpc.server import TlsConfig
from baton.shared_cores import SharedCores
from services.prefill.destinations import DecodeDirectory
from services.prefill.shipper import KvShipper

log = logging.getLogger(__name__)


class JobState(enum.Enum):
    QUEUED = "queued"  # waiting for the compute thread
    RUNNING = "running"  # taken by the compute thread, in the current batch
    DONE = "done"  # result or error delivered
    CANCELLED = "cancelled"


@dataclass
class PrefillResult:
    payload: KVPayload  # the prompt's KV and first token
    prefill_seconds: float  # compute time of this request
    queued_seconds: float  # from submit to the start of its compute


@dataclass
class Shipped:
    """A prefill whose KV the decode worker accepted."""

    result: PrefillResult
    kv_bytes: int
    transfer_seconds: float


@dataclass
class _Job:
    request: Request
    future: asyncio.Future[PrefillResult]
    loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.perf_counter)
    state: JobState = JobState.QUEUED


class PrefillWorker:
    """A queue of prefills, the thread that computes them, and the shipping of their KV; as the worker frame
    (baton/rpc/worker_frame.py) runs it. Every method but the compute thread's is called from the event loop;
    everything they share with the compute thread is guarded by one lock."""

    role = Role.PREFILL
    keeps_registered_while_draining = False  # leaves the registry first: routers send it nothing more
    load_changed = None  # its record is published every heartbeat only: routers count their own prefills meanwhile

    def __init__(
        self,
        lm: LoadedModel,
        max_queue: int = 1024,
        prefill_fn: Callable[[list[Request]], list[KVPayload]] | None = None,
        shared_cores: SharedCores | None = None,
        push_timeout_s: float = 60.0,
        tls: TlsConfig | None = None,
        internal_token: str | None = None,
        destinations: DecodeDirectory | None = None,
        spawn: Spawn = in_new_thread,
        prefix_cache_bytes: int = 0,
    ) -> None:
        self.lm = lm
        # prompts' KV kept for the next prompts that start the same way (prefix_cache.py); 0 bytes: none
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.shared_cores = shared_cores  # when set, each forward pass waits for the decode layer in progress
        self.max_queue = max_queue
        # tests wrap it to hold the compute thread
        self._prefill = prefill_fn or ModelRunner(lm, self.prefix_cache).prefill_many
        self._lock = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._batch: list[_Job] = []  # taken by the compute thread, not yet finished
        self._jobs: dict[str, _Job] = {}  # every queued or running job, by request id
        self._closing = False  # no new work
        self._stopping = False  # the compute thread exits once the queue is empty
        self._completed = 0  # prefills computed and handed out
        self.metrics = PrefillMetrics()
        self.metrics.track(running=lambda: self.occupancy().running, waiting=lambda: self.occupancy().queued)
        if self.prefix_cache is not None:
            cache = self.prefix_cache
            self.metrics.prefix_bytes.set_function(lambda: cache.bytes)
        self.shipper = KvShipper(self.metrics, push_timeout_s, tls, internal_token)
        # The decode workers KV may go to (the command line always gives them; None: any, for in-process tests).
        self.destinations = destinations
        self._serving: dict[str, asyncio.Task[Shipped]] = {}  # request id -> its prefill and push, by prefill()
        # the compute loop: on the main thread in a worker process (main_thread.py), else a thread of its own
        self._thread = spawn(self._run, "prefill-compute")

    @property
    def fingerprint(self) -> str:
        return self.lm.fingerprint

    def describe(self) -> str:
        return f"model {self.lm.name} ({self.lm.fingerprint[:12]}), queue of {self.max_queue}"

    @property
    def in_flight(self) -> int:
        """Requests taken by prefill() and not done: computing, queued, or pushing their KV."""
        return len(self._serving)

    # -- called from the event loop ------------------------------------------------------------------
    async def prefill(self, req: Request, decode_address: str, held_tokens: int = 0) -> Shipped:
        """Prefill the request and push its KV to the decode worker at `decode_address`, less its first
        `held_tokens` tokens' KV, which that worker's prefix cache holds (should it no longer hold them, it
        refuses, and the whole KV goes). Raises InvalidRequestError, Overloaded, Unavailable, Cancelled,
        KvPushFailed, or the compute's error."""
        if req.id in self._serving:
            raise InvalidRequestError("request_id", f"request id {req.id!r} is already in use on this worker")
        if held_tokens % BLOCK_TOKENS or not 0 <= held_tokens < len(req.all_ids):
            raise InvalidRequestError("held_tokens", f"{held_tokens} is not a whole number of {BLOCK_TOKENS}-token "
                                                     f"blocks less than the request's {len(req.all_ids)} tokens")
        if self.destinations is not None:
            await self.destinations.check(decode_address)
        task = asyncio.ensure_future(self._prefill_and_ship(req, decode_address, held_tokens))
        self._serving[req.id] = task
        try:
            return await task
        finally:
            if self._serving.get(req.id) is task:
                del self._serving[req.id]

    async def _prefill_and_ship(self, req: Request, decode_address: str, held_tokens: int) -> Shipped:
        result = await self.submit(req)  # if this is cancelled, so is the future, which drops the prefill
        if held_tokens:
            try:
                kv_bytes, seconds = await self.shipper.ship(result.payload.leave_out(held_tokens), decode_address)
                return Shipped(result, kv_bytes, seconds)
            except KvPushFailed as e:
                if e.upstream is not Reason.PREFIX_EVICTED:
                    raise
                log.info("request %s: %s; pushing the whole KV", req.id, e)
        kv_bytes, seconds = await self.shipper.ship(result.payload, decode_address)
        return Shipped(result, kv_bytes, seconds)

    def validate(self, req: Request) -> None:
        """The model's limits (ModelSpec.check_request); Request and SamplingParams checked the rest."""
        self.lm.spec.check_request(req.prompt_ids, req.params.max_new_tokens, req.output_ids,
                                   req.params.token_fields)
        req.constrain(self.lm.grammars)

    def submit(self, req: Request) -> asyncio.Future[PrefillResult]:
        """Queue a prefill; the returned future gives its result (or raises Cancelled, or the compute's error).
        Cancelling the future cancels the request. Raises InvalidRequestError, Overloaded (queue full) or
        Unavailable (shutting down)."""
        self.validate(req)
        loop = asyncio.get_running_loop()
        job = _Job(req, loop.create_future(), loop)
        with self._lock:
            if self._closing:
                raise Unavailable("prefill worker is shutting down")
            if req.id in self._jobs:
                raise InvalidRequestError("request_id", f"request id {req.id!r} is already in use on this worker")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"prefill queue is full ({self.max_queue} requests)", retry_after_s=1.0)
            self._queue.append(job)
            self._jobs[req.id] = job
            self._lock.notify()
        job.future.add_done_callback(lambda f: self._on_future_done(job, f))
        return job.future

    def cancel(self, request_id: str) -> bool:
        """Drop a queued or running prefill, or stop its KV push; True when it was found. Its future (or
        prefill()) raises Cancelled."""
        if self.shipper.cancel(request_id):
            return True
        with self._lock:
            job = self._jobs.get(request_id)
            if job is None:
                return False
            self._cancel_locked(job)
        if not job.future.done():
            job.future.set_exception(Cancelled(f"request {request_id!r} was cancelled"))
        return True

    def occupancy(self) -> PrefillLoad:
        with self._lock:
            running = sum(1 for j in self._batch if j.state is JobState.RUNNING)
            return PrefillLoad(waiting=len(self._queue) + running, running=running, completed=self._completed)

    @property
    def queued_ids(self) -> list[str]:
        with self._lock:
            return [j.request.id for j in self._queue]

    @property
    def running_ids(self) -> list[str]:
        with self._lock:
            return [j.request.id for j in self._batch if j.state is JobState.RUNNING]

    def close_intake(self) -> None:
        """Take no new work; what is queued or running still completes."""
        with self._lock:
            self._closing = True

    async def drain(self) -> None:
        """Stop taking work and wait until nothing is queued, computed or pushed."""
        self.close_intake()
        while self.occupancy().waiting or self._serving:
            await asyncio.sleep(0.01)

    def hand_off(self) -> int:
        """Cancel every prefill still in flight (its caller gets CANCELLED and tries another worker)."""
        live = list(self._serving.items())
        for rid, task in live:
            if not self.cancel(rid):  # between its compute and its push
                task.cancel()
        return len(live)

    async def close(self) -> None:
        """Stop the compute thread and close the channels to decode workers."""
        if self.destinations is not None:
            await self.destinations.close()
        self.shutdown()
        await self.shipper.close()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the compute thread; queued requests are cancelled, a running prefill finishes first."""
        with self._lock:
            self._closing = self._stopping = True
            dropped = list(self._queue)
            for job in dropped:
                self._cancel_locked(job)
            self._lock.notify_all()
        for job in dropped:
            self._deliver(job, error=Cancelled(f"request {job.request.id!r}: prefill worker shut down"))
        self._thread.join(timeout_s)

    # -- internals -----------------------------------------------------------------------------------

    def _cancel_locked(self, job: _Job) -> None:
        if job.state is JobState.QUEUED:
            self._queue.remove(job)
        if job.state in (JobState.QUEUED, JobState.RUNNING):
            job.state = JobState.CANCELLED
            self.metrics.requests.labels(outcome="cancelled").inc()
        self._jobs.pop(job.request.id, None)

    def _on_future_done(self, job: _Job, fut: asyncio.Future[PrefillResult]) -> None:
        if fut.cancelled():  # the submitter gave up (e.g. its RPC was cancelled)
            with self._lock:
                if self._jobs.get(job.request.id) is job:
                    self._cancel_locked(job)

    def _run(self) -> None:
        """The compute thread: take every queued job, prefill them in packed runs, repeat."""
        while True:
            with self._lock:
                while not self._queue and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                for job in batch:
                    job.state = JobState.RUNNING
                self._batch = batch
                self.metrics.batch_size.observe(len(batch))
            for run in pack_for_prefill([len(job.request.all_ids) for job in batch]):
                self._compute([batch[i] for i in run])
            with self._lock:
                self._batch = []

    def _compute(self, run: list[_Job]) -> None:
        with self._lock:  # drop the jobs cancelled while they waited in this batch
            jobs = [job for job in run if job.state is JobState.RUNNING]
        if not jobs:
            return
        start = time.perf_counter()
        before = dataclasses.replace(self.prefix_cache.stats) if self.prefix_cache is not None else None
        try:
            with self.shared_cores.prefill() if self.shared_cores else contextlib.nullcontext():
                payloads = self._prefill([job.request for job in jobs])
        except Exception as e:  # noqa: BLE001 - handed to the submitters
            log.exception("prefill of %s failed", ", ".join(job.request.id for job in jobs))
            for job in jobs:
                with self._lock:
                    if job.state is JobState.RUNNING:
                        job.state = JobState.DONE
                        self.metrics.requests.labels(outcome="failed").inc()
                        self._jobs.pop(job.request.id, None)
                self._deliver(job, error=e)
            return
        seconds = time.perf_counter() - start  # the run's compute time, which each of its requests waited
        self.metrics.busy.inc(seconds)
        if self.prefix_cache is not None and before is not None:
            now = self.prefix_cache.stats
            self.metrics.prefix_hit_tokens.inc(now.hit_tokens - before.hit_tokens)
            self.metrics.prefix_miss_tokens.inc(now.miss_tokens - before.miss_tokens)
            self.metrics.prefix_evictions.inc(now.evicted_blocks - before.evicted_blocks)
        for job, payload in zip(jobs, payloads, strict=True):
            with self._lock:
                if job.state is not JobState.RUNNING:  # cancelled during the compute: drop the KV
                    continue
                job.state = JobState.DONE
                self._jobs.pop(job.request.id, None)
                self._completed += 1
                self.metrics.computed(job.request.prompt_len, start - job.submitted_at, seconds)
            self._deliver(job, PrefillResult(payload, seconds, start - job.submitted_at))

    def _deliver(self, job: _Job, result: PrefillResult | None = None, error: BaseException | None = None) -> None:
        """Complete the job's future on its own event loop (futures are not thread-safe)."""

        def complete() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)  # type: ignore[arg-type]

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            job.loop.call_soon_threadsafe(complete)
