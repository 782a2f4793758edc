"""One attempt at serving a request: reserve a decode row, have it prefilled, stream its tokens, close; and what
a worker's failure means for the request. Router.generate (core.py) is a loop over attempts.

An attempt's life:
1. `start`: the Scheduler picks a decode worker D with room for prompt + max_new_tokens KV tokens (or the request
   waits in the router's queue); DecodeWorker.Decode on D reserves a row, and its first message, with no tokens,
   confirms the reservation. A worker that refuses (full: another router got there first) is skipped for
   another. Then PrefillWorker.Prefill(request, D) runs in the background on the prefill worker with the
   shortest queue, which pushes the KV straight to D; a prefill worker that is full or gone is skipped. A request
   whose tokens to prefill number at most the router's --local-prefill-tokens is reserved with prefill_here
   instead: D runs its prompt inside its batch's next iteration, and no prefill worker is asked. Those are counted
   less the prompt's first blocks that D's prefix cache holds (the scheduler prefers the decode worker holding
   most of them): a conversation's next turn is computed where its history is, and only its new tokens. A prompt
   that does go through a prefill worker has its KV pushed less those blocks (PrefillRequest.held_tokens).
2. `messages`: D's messages as they come. The attempt ends with the message that carries a finish reason.
3. `close`: whatever is left of the attempt is stopped on its workers (the Decode call cancelled, so D drops
   the row; a prefill still pending cancelled on its worker); nothing, once the attempt finished.

Failures are classified by their reason (baton/errors.py), never their text. One that another attempt on other
workers can repair raises Recoverable: the decode worker died, drained or left the registry; it ended the
request CANCELLED unasked; the row's KV lease expired; the KV push failed on the decode side. Any other ends
the request with its error.

The invariant that makes another attempt safe (resuming): the router has relayed to the client exactly the
tokens it received from decode workers, in order, and a decode worker ends a request in the same message as its
last token (so a stream that breaks or ends without a finish reason, or that a worker ends CANCELLED without
being asked, left the request unfinished). So a request can always be resumed by prefilling prompt + those
tokens on other workers and decoding on from there (`resumed_request`). The workers take them as the request's
own output (WorkerRequest.output_ids): greedy and seeded sampling continue as in an undisturbed run (the
sampler draws token k from (seed, k)), a stop string spanning two attempts is seen whole, max_new_tokens counts
every token, and usage counts the original prompt only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Coroutine
from typing import Any

import grpc

from baton.engine.prefix_cache import BLOCK_TOKENS, block_keys
from baton.engine.request import FinishReason
from baton.errors import (
    DeadlineExceeded,
    InvalidRequestError,
    Overloaded,
    Reason,
    ServiceError,
    Unavailable,
    error_of,
)
from baton.metrics import RouterMetrics
from baton.rpc.convert import finish_from_proto
from baton.rpc.status import error_from_rpc
from baton.v1 import baton_pb2 as pb
from services.router.pool import WorkerPool
from services.router.scheduler import Scheduler, Ticket
from services.router.trace import Trace

log = logging.getLogger(__name__)

MAX_RESERVE_ATTEMPTS = 8  # decode workers tried for one attempt before giving up
# How long a resumed request waits for a decode worker to be known again when none is (the router's
# --queue-timeout-s, when set, instead).
RECOVERY_WAIT_S = 30.0
# A decode worker's stream that fails with one of these lost the worker (it died, drained and handed the request
# off, or shut down); one that fails with any other reason ends the request, but for an expired KV lease.
WORKER_GONE = frozenset({Reason.UNAVAILABLE, Reason.CANCELLED})


class Recoverable(Exception):
    """An attempt failed in a way another attempt, on other workers, can repair; the message says what failed."""


def resumed_request(request: pb.WorkerRequest, sent: list[int]) -> pb.WorkerRequest:
    """The request as another attempt sends it: the tokens already streamed become its output so far."""
    again = pb.WorkerRequest()
    again.CopyFrom(request)
    again.output_ids[:] = sent
    again.parameters.ClearField("prompt_logprobs")  # they came with the first token, already relayed
    return again


def worker_error(role: str, address: str, e: grpc.RpcError) -> ServiceError:
    """A worker's failed call as the error the router raises: its reason and field as the worker sent them,
    its text prefixed with the worker it came from (an invalid request's text stays the worker's own). A worker
    that refuses the internal token is an internal error (logged), not the client's missing API key."""
    err = error_from_rpc(e)
    if isinstance(err, InvalidRequestError):
        return err
    if err.reason is Reason.UNAUTHENTICATED:  # the cluster's misconfiguration, never the client's fault
        log.error("%s worker %s refuses the router's internal token: do the services share one? (%s)", role,
                  address, err)
        return ServiceError(f"{role} worker {address} refused the router's internal token")
    return error_of(err.reason, f"{role} worker {address}: {err}", retry_after_s=err.retry_after_s,
                    upstream=getattr(err, "upstream", None))


def remaining(deadline: float | None, cap: float | None = None) -> float | None:
    """Seconds left until `deadline` (loop time), at most `cap`. Raises DeadlineExceeded once it passed."""
    if deadline is None:
        return cap
    left = deadline - asyncio.get_running_loop().time()
    if left <= 0:
        raise DeadlineExceeded("the request's deadline passed")
    return left if cap is None else min(left, cap)


class Background:
    """Tasks nobody awaits (cancel calls to workers), kept referenced until done; their errors are only logged."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.debug("background task failed: %s", t.exception())

        task.add_done_callback(done)
        return task

    def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def _succeeded(task: asyncio.Future[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


class Attempt:
    """One placement of a request: a reserved decode row, the prefill that fills it, the stream of its tokens."""

    def __init__(self, pool: WorkerPool, request: pb.WorkerRequest, need_tokens: int, deadline: float | None,
                 trace: Trace, metrics: RouterMetrics, background: Background, *, kv_timeout_s: float,
                 queue_timeout_s: float | None, max_retries: int, local_prefill_tokens: int = 0) -> None:
        self.pool, self.request, self.need_tokens, self.deadline = pool, request, need_tokens, deadline
        self.trace, self.metrics, self.background = trace, metrics, background
        self.kv_timeout_s, self.queue_timeout_s, self.max_retries = kv_timeout_s, queue_timeout_s, max_retries
        self.choices = max(1, request.n)  # rows: n choices spliced from one prefill
        self.local_prefill_tokens = local_prefill_tokens
        tokens = list(request.prompt_ids) + list(request.output_ids)  # a resumed request prefills those too
        self.tokens = len(tokens)
        # its whole prompt blocks' keys, as decode workers' prefix caches name them (the last token never counts)
        self.prefix = [k.hex() for k in block_keys(tokens, (len(tokens) - 1) // BLOCK_TOKENS)]
        self.prefill_here = False  # decided with the worker (_local): it may hold the prompt's first blocks
        self._open = set(range(self.choices))  # choices not finished
        self.ticket: Ticket | None = None
        self.call: grpc.aio.UnaryStreamCall | None = None
        self.prefill: asyncio.Task[pb.PrefillResponse | None] | None = None
        self._gone: asyncio.Future[Any] | None = None
        self.finished = False

    @property
    def scheduler(self) -> Scheduler:
        return self.pool.scheduler

    @property
    def address(self) -> str:
        assert self.ticket is not None
        return self.ticket.address

    # ---- start: reserve a row, then prefill ------------------------------------------------------------
    async def start(self, resuming: bool) -> None:
        """Reserve a row (at the head of the router's queue when `resuming`: that request already streams) and
        start the prefill."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (self.queue_timeout_s or RECOVERY_WAIT_S)
        while True:
            try:
                self.ticket, self.call = await self._reserve(resuming)
                break
            except Unavailable:
                # A new request fails fast when no decode worker is known; one that is already streaming waits
                # for one to come back (the only other one restarting, or briefly marked failed).
                if not resuming or loop.time() >= give_up:
                    raise
                await asyncio.sleep(self.pool.poll_s)
        self.metrics.chose("decode", self.address)
        self.trace.prefilled_by_decode = self.prefill_here
        self.prefill = self.background.spawn(self._prefill())
        self._gone = asyncio.ensure_future(self.pool.gone(self.address).wait())

    async def _reserve(self, first: bool) -> tuple[Ticket, grpc.aio.UnaryStreamCall]:
        """A decode worker's confirmed reservation, and the Decode call that will stream the tokens."""
        retry = first
        for _ in range(MAX_RESERVE_ATTEMPTS):
            wait = remaining(self.deadline, self.queue_timeout_s)
            try:
                ticket = await self.scheduler.acquire(self.need_tokens, wait, retry, rows=self.choices,
                                                      prefix=self.prefix)
            except Overloaded:
                if self.deadline is not None and asyncio.get_running_loop().time() >= self.deadline - 0.01:
                    passed = "the request's deadline passed while it waited for a decode worker"
                    raise DeadlineExceeded(passed) from None
                raise
            self.prefill_here = self._local(ticket)
            call: grpc.aio.UnaryStreamCall | None = None
            try:
                call = self.pool.decode_stub(ticket.address).Decode(
                    pb.DecodeRequest(request=self.request, kv_timeout_seconds=self.kv_timeout_s,
                                     prefill_here=self.prefill_here),
                    timeout=remaining(self.deadline),
                )
                msg = await call.read()
            except grpc.aio.AioRpcError as e:
                err = worker_error("decode", ticket.address, e)
                if err.reason is Reason.OVERLOADED:
                    self.scheduler.refused(ticket)  # another router filled it since the last report
                elif err.reason in WORKER_GONE:  # it died or shut down: as the old router, try another
                    self.scheduler.failed(ticket)
                else:
                    self.scheduler.release(ticket)
                    raise err from None
                log.info("request %s: decode worker %s refused (%s); trying again", self.request.request_id,
                         ticket.address, err.reason.value)
                retry = True
                continue
            except BaseException:
                if call is not None:
                    call.cancel()
                self.scheduler.release(ticket)
                raise
            if msg is grpc.aio.EOF or msg.token_ids or msg.finish_reason:
                call.cancel()
                self.scheduler.release(ticket)
                raise ServiceError(f"decode worker {ticket.address} did not confirm the reservation")
            self.scheduler.accepted(ticket)
            return ticket, call
        raise Overloaded("decode workers kept refusing the request; retry later", retry_after_s=1.0)

    @property
    def held(self) -> int:
        """The prompt's first tokens whose KV the decode worker's prefix cache holds, as its reports say: the
        prefill's KV push leaves them out (the worker refuses the push should it no longer hold them, and the whole
        KV goes)."""
        assert self.ticket is not None
        return self.ticket.cached_blocks * BLOCK_TOKENS

    def _local(self, ticket: Ticket) -> bool:
        """Whether the decode worker prefills the request itself: what it must compute (the prompt less the blocks
        its prefix cache holds) is at most --local-prefill-tokens; several choices fork from a pushed prefill."""
        uncached = self.tokens - ticket.cached_blocks * BLOCK_TOKENS
        return self.choices == 1 and uncached <= self.local_prefill_tokens

    async def _prefill(self) -> pb.PrefillResponse | None:
        """Have a prefill worker compute the prompt's KV and push it to this attempt's decode worker. A prefill
        worker that is full or gone is skipped for the next one. Nothing when the decode worker prefills it."""
        if self.prefill_here:
            return None
        tried: list[str] = []
        refusals: list[str] = []  # prefill workers that do not know this attempt's decode worker
        rid = self.request.request_id
        while True:
            try:
                ticket = self.scheduler.pick_prefill(exclude=tried)
            except Unavailable:
                if not tried:
                    raise
                raise Unavailable(f"every prefill worker refused request {rid}"
                                  + "".join(f"; {r}" for r in refusals)) from None
            self.trace.prefill = ticket.address
            self.metrics.chose("prefill", ticket.address)
            try:
                return await self.pool.prefill_stub(ticket.address).Prefill(
                    pb.PrefillRequest(request=self.request, decode_address=self.address, held_tokens=self.held),
                    timeout=remaining(self.deadline),
                )
            except grpc.aio.AioRpcError as e:
                err = worker_error("prefill", ticket.address, e)
                if err.reason is Reason.KV_PUSH_FAILED:  # the decode side failed: another attempt, another row
                    raise Recoverable(str(err)) from None
                if err.reason is Reason.OVERLOADED:
                    self.scheduler.refused(ticket)
                elif err.reason is Reason.UNKNOWN_PEER:  # it does not know this decode worker (yet): another may
                    log.warning("request %s: %s", rid, err)
                    refusals.append(str(err))
                elif err.reason in (Reason.UNAVAILABLE, Reason.CANCELLED):  # died or shut down
                    self.scheduler.failed(ticket)
                    self.metrics.recovered("prefill_retry")
                    self.trace.recoveries.append(str(err))
                    if len(self.trace.recoveries) > self.max_retries:
                        raise Unavailable(f"request {rid} failed {len(self.trace.recoveries)} times: "
                                          + "; ".join(self.trace.recoveries)) from None
                else:
                    raise err from None
                log.info("request %s: prefill worker %s refused (%s); trying another", rid, ticket.address,
                         err.reason.value)
                tried.append(ticket.address)
            finally:
                self.scheduler.release(ticket)

    # ---- the stream ------------------------------------------------------------------------------------
    async def messages(self) -> AsyncGenerator[pb.DecodeResponse, None]:
        """The decode worker's messages that carry tokens, ending with the one that carries the (last choice's)
        finish reason. Raises Recoverable when the attempt failed in a way another can repair, or the error that
        ends the request."""
        assert self.call is not None and self.prefill is not None and self._gone is not None
        streamed = False  # a token came: the KV reached the decode worker, a prefill error no longer matters
        read: asyncio.Future[Any] | None = None
        try:
            while True:
                if read is None:
                    read = asyncio.ensure_future(self.call.read())
                waits = {read, self._gone} if self.prefill.done() else {read, self._gone, self.prefill}
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if read.done():
                    msg = self._message(read)
                    read = None
                    streamed = streamed or bool(msg.token_ids)
                    reason = finish_from_proto(msg.finish_reason)
                    if reason is FinishReason.CANCELLED:  # not asked for by this router: the worker gave up
                        if msg.token_ids:  # relayed as tokens only: the request is not finished
                            yield pb.DecodeResponse(token_ids=msg.token_ids)
                        raise Recoverable(f"decode worker {self.address} cancelled the request")
                    if reason is not None:
                        self._open.discard(msg.index)
                        self.finished = not self._open
                    if msg.token_ids or reason is not None:
                        yield msg
                    if self.finished:
                        return
                    continue
                if self.prefill.done() and not streamed and not self.prefill.cancelled():
                    error = self.prefill.exception()
                    if error is not None:
                        raise error
                if self._gone.done():
                    raise Recoverable(f"decode worker {self.address} left the registry (missed its heartbeats)")
        finally:
            if read is not None:
                read.cancel()

    def _message(self, read: asyncio.Future[Any]) -> pb.DecodeResponse:
        try:
            msg = read.result()
        except grpc.aio.AioRpcError as e:
            err = worker_error("decode", self.address, e)
            if err.reason in WORKER_GONE:
                assert self.ticket is not None
                self.scheduler.failed(self.ticket)
                raise Recoverable(str(err)) from None
            if err.reason is Reason.KV_LEASE_EXPIRED:  # the row's KV never came
                raise Recoverable(str(err)) from None
            raise err from None  # the client's deadline passed, or the request cannot be served
        if msg is grpc.aio.EOF:
            assert self.ticket is not None
            self.scheduler.failed(self.ticket)
            raise Recoverable(f"decode worker {self.address} ended the stream before the request finished")
        assert isinstance(msg, pb.DecodeResponse)
        return msg

    # ---- close -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop what is left of this attempt on its workers (nothing, once it finished)."""
        if self._gone is not None:
            self._gone.cancel()
        if self.call is not None and not self.finished:
            self.call.cancel()  # the decode worker drops the row
        if self.prefill is not None and not self.finished and not _succeeded(self.prefill):
            self.prefill.cancel()  # a prefill still queued (or failed midway) is dropped on its worker too
            if self.trace.prefill is not None:
                self.background.spawn(self._cancel_prefill(self.trace.prefill))
        if self.ticket is not None:
            self.scheduler.release(self.ticket)

    async def _cancel_prefill(self, address: str) -> None:
        rid = self.request.request_id
        try:
            await self.pool.prefill_stub(address).Cancel(pb.CancelRequest(request_id=rid), timeout=5.0)
        except grpc.aio.AioRpcError as e:
            log.debug("request %s: cancel on prefill worker %s failed: %s", rid, address, e.code().name)
