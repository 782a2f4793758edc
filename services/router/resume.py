"""Recovery: a request whose decode worker dies, drains or loses its KV goes on elsewhere, and its client's stream
with it, with no token lost, repeated or changed.

The invariant recovery relies on: the router has relayed to the client exactly the tokens it received from decode
workers (`sent`), in order, and a decode worker ends a request in the same message as its last token (so a stream
that breaks or ends without a finish reason, or that a worker ends CANCELLED without being asked, left the request
unfinished). So a request can always be resumed by prefilling prompt + sent on another worker and decoding on
from there. The workers take `sent` as the request's own output (WorkerRequest.output_ids): greedy and seeded
sampling continue as in an undisturbed run (the sampler draws token k from (seed, k)), a stop string spanning the
two attempts is seen whole, max_new_tokens counts every token, and usage counts the original prompt only.

One Attempt is one placement of the request: a reserved decode row, the prefill that fills it, and the stream of
its tokens. An attempt that fails in a way other workers can repair raises Recoverable; Router.generate then
starts another, up to Router.max_retries times.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from baton.rpc.server import Unavailable
from baton.v1 import baton_pb2 as pb

if TYPE_CHECKING:
    from services.router.core import Router, _Trace
    from services.router.scheduler import Ticket

# services/prefill/server.py words a failed KV push so: the decode side failed, not the prefill worker.
KV_PUSH_FAILED = "KV push to decode worker"
# services/decode/worker.py words the end of a reservation whose KV never came so (DEADLINE_EXCEEDED).
KV_LEASE_EXPIRED = "no KV arrived"


# How long a recovering request waits for a decode worker to be known again when none is (the router's
# --queue-timeout-s, when set, instead).
RECOVERY_WAIT_S = 30.0


class Recoverable(Exception):
    """An attempt failed in a way another attempt, on other workers, can repair; the message says what failed."""


@dataclass
class RecoveryStats:
    """Counts since the router started."""

    resumed: int = 0  # new attempts for requests that had streamed tokens already
    restarted: int = 0  # new attempts for requests that had not streamed a token yet
    prefill_retries: int = 0  # prefills moved to another prefill worker (the first failed or went away)
    gave_up: int = 0  # requests failed after max_retries recoveries


def resumed_request(request: pb.WorkerRequest, sent: list[int]) -> pb.WorkerRequest:
    """The request as another attempt sends it: the tokens already streamed become its output so far."""
    again = pb.WorkerRequest()
    again.CopyFrom(request)
    again.output_ids[:] = sent
    return again


def succeeded(task: asyncio.Future[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


class Attempt:
    """One placement of a request: reserve a decode row, have it prefilled, stream its messages."""

    def __init__(
        self, router: Router, request: pb.WorkerRequest, need_tokens: int, deadline: float | None, trace: _Trace
    ) -> None:
        self.router, self.request, self.need_tokens, self.deadline, self.trace = (
            router, request, need_tokens, deadline, trace,
        )
        self.ticket: Ticket | None = None
        self.call: grpc.aio.UnaryStreamCall | None = None
        self.prefill: asyncio.Task[pb.PrefillResponse] | None = None
        self._read: asyncio.Future[Any] | None = None
        self._gone: asyncio.Future[Any] | None = None
        self.streamed = False  # a token came: the KV reached the decode worker, a prefill error no longer matters
        self.finished = False

    @property
    def address(self) -> str:
        assert self.ticket is not None
        return self.ticket.address

    async def start(self, first: bool) -> None:
        """Reserve a row (at the head of the router's queue with `first`: a resumed request already streams) and
        start the prefill."""
        router = self.router
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (router.queue_timeout_s or RECOVERY_WAIT_S)
        while True:
            try:
                self.ticket, self.call = await router._reserve(self.request, self.need_tokens, self.deadline, first)
                break
            except Unavailable:
                # A new request fails fast when no decode worker is known; one that is already streaming waits
                # for one to come back (the only other one restarting, or briefly marked failed).
                if not first or loop.time() >= give_up:
                    raise
                await asyncio.sleep(router.pool.poll_s)
        self.prefill = router._spawn(router._prefill(self.request, self.address, self.deadline, self.trace))
        self._gone = asyncio.ensure_future(router.pool.gone(self.address).wait())

    async def next(self) -> pb.DecodeResponse:
        """The decode worker's next message. Raises Recoverable when the attempt failed in a way another can
        repair, or the error that ends the request."""
        assert self.call is not None and self.prefill is not None and self._gone is not None
        while True:
            if self._read is None:
                self._read = asyncio.ensure_future(self.call.read())
            waits = {self._read, self._gone} if self.prefill.done() else {self._read, self._gone, self.prefill}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if self._read.done():
                read, self._read = self._read, None
                msg = self._message(read)
                self.streamed = self.streamed or bool(msg.token_ids)
                return msg
            if self.prefill.done() and not self.streamed and not self.prefill.cancelled():
                error = self.prefill.exception()
                if error is not None:
                    raise error
            if self._gone.done():
                raise Recoverable(f"decode worker {self.address} left the registry (missed its heartbeats)")

    def _message(self, read: asyncio.Future[Any]) -> pb.DecodeResponse:
        try:
            return self.router._decode_message(read, self.address)
        except Unavailable as e:  # the worker died, drained (handing the request off) or closed the stream
            assert self.ticket is not None
            self.router.scheduler.failed(self.ticket)
            raise Recoverable(str(e)) from None
        except TimeoutError as e:
            if KV_LEASE_EXPIRED not in str(e):
                raise  # the client's deadline passed
            raise Recoverable(str(e)) from None  # the row's KV lease ran out: the KV never came

    def close(self) -> None:
        """Stop what is left of this attempt on its workers (nothing, once it finished)."""
        for f in (self._read, self._gone):
            if f is not None:
                f.cancel()
        if self.call is not None and not self.finished:
            self.call.cancel()  # the decode worker drops the row
        if self.prefill is not None and not self.finished and not succeeded(self.prefill):
            self.prefill.cancel()  # a prefill still queued (or failed midway) is dropped on its worker too
            if self.trace.prefill is not None:
                self.router._spawn(self.router._cancel_prefill(self.trace.prefill, self.request.request_id))
        if self.ticket is not None:
            self.router.scheduler.release(self.ticket)
