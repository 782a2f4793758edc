"""The router's core, free of its public transports: validate a request, place it on a decode and a prefill
worker, and stream its tokens and text back. The gRPC API (grpc_api.py) and the HTTP API (http_api.py) are thin
layers over Router.generate.

One request's path (see proto/baton/v1/baton.proto):
1. The Scheduler picks a decode worker D with room for prompt + max_new_tokens KV tokens (or the request
   waits in the router's queue). DecodeWorker.Decode on D reserves a row; its first message, with no tokens,
   confirms the reservation. A worker that refuses (full: another router got there first) is skipped.
2. The Scheduler picks the prefill worker P with the shortest queue; PrefillWorker.Prefill(request, D) runs
   concurrently: P computes the prompt's KV and pushes it straight to D.
3. D's tokens are relayed as they come, detokenized incrementally; the last message carries the finish
   reason. Then the request is logged as one JSON line.
A request that ends early (client gone, cancelled, an error on either worker) is stopped everywhere: the
Decode call is cancelled (D drops the row) and a prefill still pending is cancelled on P.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from baton.engine.models import resolve_model_path
from baton.engine.request import FinishReason, InvalidRequestError, SamplingParams, check_model_limits
from baton.rpc.convert import finish_from_proto, params_to_proto
from baton.rpc.server import NotFound, Overloaded, ServiceError, Unavailable
from baton.v1 import baton_pb2 as pb
from services.router.pool import WorkerPool
from services.router.scheduler import Scheduler, Ticket

log = logging.getLogger(__name__)

MAX_RESERVE_ATTEMPTS = 8  # decode workers tried for one request before giving up
MAX_REQUEST_ID_CHARS = 256


@dataclass
class StreamEvent:
    """New tokens of a request and their text; the last event carries the finish reason and the usage."""

    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TextStream:
    """Incremental detokenization. Text is released only once it is final: an incomplete UTF-8 tail (decoded
    as '\\ufffd') and a tail that may be the start of a stop string are held back until the next tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""  # text released so far

    def decode(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def add(self, token_ids: list[int]) -> str:
        """Take new tokens; return the text they release."""
        self.ids += token_ids
        text = self.decode().rstrip("\ufffd")
        for s in self.stop:  # the worker ends the request at a stop string: never release one
            if s in text:
                text = text[: text.index(s)]
        text = text[: len(text) - self._stop_prefix(text)]
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, stop_text: str | None) -> str:
        """The rest of the text once the request ended; `stop_text` is the whole text when a stop string ended it."""
        final = stop_text if stop_text is not None else self.decode()
        if not final.startswith(self.sent):
            log.warning("streamed text %r is not a prefix of the final text %r", self.sent, final)
            return ""
        delta, self.sent = final[len(self.sent) :], final
        return delta

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string begins with."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:k]):
                    longest = k
                    break
        return longest


@dataclass
class _Trace:
    """What the request log line says about one request."""

    id: str
    start: float
    prompt_tokens: int
    decode: str | None = None
    prefill: str | None = None
    completion_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None

    def log(self) -> None:
        now = time.perf_counter()
        line: dict[str, Any] = {
            "request_id": self.id,
            "decode_worker": self.decode,
            "prefill_worker": self.prefill,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "ttft_s": None if self.first_token_at is None else round(self.first_token_at - self.start, 4),
            "e2e_s": round(now - self.start, 4),
            "finish_reason": self.finish_reason,
        }
        if self.error is not None:
            line["error"] = self.error
        log.info("%s", json.dumps(line))


class Router:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        max_context: int,
        vocab_size: int,
        pool: WorkerPool,
        kv_timeout_s: float = 30.0,
        queue_timeout_s: float = 30.0,
    ) -> None:
        self.tokenizer, self.model_name = tokenizer, model_name
        self.max_context, self.vocab_size = max_context, vocab_size
        self.pool = pool
        self.kv_timeout_s, self.queue_timeout_s = kv_timeout_s, queue_timeout_s
        self._active: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()

    @classmethod
    def load(cls, model: str, pool: WorkerPool, **kwargs: Any) -> Router:
        """A router for a model: its tokenizer and config only (the router never loads weights)."""
        path = resolve_model_path(model)
        config = AutoConfig.from_pretrained(path)
        max_context = next(
            (int(getattr(config, k)) for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)),
            2048,
        )
        return cls(AutoTokenizer.from_pretrained(path), model, max_context, int(config.vocab_size), pool, **kwargs)

    @property
    def scheduler(self) -> Scheduler:
        return self.pool.scheduler

    @property
    def in_flight(self) -> int:
        """Requests being served now."""
        return len(self._active)

    async def start(self) -> None:
        await self.pool.start()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await self.pool.close()

    # ---- prompts -----------------------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        if not isinstance(text, str) or not text:
            raise InvalidRequestError("prompt", "must be a non-empty string")
        return list(self.tokenizer.encode(text))

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat as the model's template writes it, ending with the assistant's turn."""
        if not (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        ):
            raise InvalidRequestError("messages", "must be a non-empty list of objects with a role and a content")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template decides what a chat may hold (jinja errors, ValueError ...)
            raise InvalidRequestError("messages", f"chat template failed: {e}") from e
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # the template wrote the special tokens

    def validate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises InvalidRequestError naming the field when the request cannot be served by this model."""
        if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequestError("request_id", f"must be 1 to {MAX_REQUEST_ID_CHARS} characters")
        if request_id in self._active:
            raise InvalidRequestError("request_id", f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise InvalidRequestError("prompt", "must not be empty")
        check_model_limits(prompt_ids, params.max_new_tokens, self.max_context, self.vocab_size)

    # ---- generation --------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None
    ) -> AsyncGenerator[StreamEvent, None]:
        """Stream a request's tokens. Stopping the iteration early (aclose, cancellation) cancels the request on
        its workers. `timeout`: seconds the whole request may take (the client's deadline)."""
        trace = _Trace(request_id, time.perf_counter(), len(prompt_ids))
        try:
            self.validate(request_id, prompt_ids, params)
        except InvalidRequestError as e:
            trace.error = str(e)
            trace.log()
            raise
        self._active.add(request_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        request = pb.WorkerRequest(request_id=request_id, prompt_ids=prompt_ids, parameters=params_to_proto(params))
        ticket: Ticket | None = None
        call: grpc.aio.UnaryStreamCall | None = None
        prefill: asyncio.Task[pb.PrefillResponse] | None = None
        read: asyncio.Future[Any] | None = None
        finished = False
        try:
            ticket, call = await self._reserve(request, len(prompt_ids) + params.max_new_tokens, deadline)
            trace.decode = ticket.address
            prefill = self._spawn(self._prefill(request, ticket.address, deadline, trace))
            text = TextStream(self.tokenizer, params.stop)
            while True:
                if read is None:
                    read = asyncio.ensure_future(call.read())
                await asyncio.wait({read} if prefill.done() else {read, prefill}, return_when=asyncio.FIRST_COMPLETED)
                if prefill.done() and not prefill.cancelled() and prefill.exception() is not None:
                    raise prefill.exception()  # type: ignore[misc]
                if not read.done():
                    continue
                msg = self._decode_message(read, ticket.address)
                read = None
                ids = list(msg.token_ids)
                trace.completion_tokens += len(ids)
                if ids and trace.first_token_at is None:
                    trace.first_token_at = time.perf_counter()
                reason = finish_from_proto(msg.finish_reason)
                if reason is None:
                    if ids:
                        yield StreamEvent(ids, text.add(ids))
                    continue
                delta = text.add(ids) + text.finish(msg.stop_text if msg.HasField("stop_text") else None)
                finished = True
                trace.finish_reason = reason.value
                yield StreamEvent(ids, delta, reason, len(prompt_ids), trace.completion_tokens)
                return
        except BaseException as e:
            if not finished:  # (closing the stream after its last event is not an error)
                trace.error = "cancelled" if isinstance(e, (asyncio.CancelledError, GeneratorExit)) else str(e)
            raise
        finally:
            if read is not None:
                read.cancel()
            if call is not None and not finished:
                call.cancel()  # the decode worker drops the row
            if prefill is not None and not finished and not _succeeded(prefill):
                prefill.cancel()  # a prefill still queued (or failed midway) is dropped on its worker too
                if trace.prefill is not None:
                    self._spawn(self._cancel_prefill(trace.prefill, request_id))
            if ticket is not None:
                self.scheduler.release(ticket)
            self._active.discard(request_id)
            trace.log()

    async def _reserve(
        self, request: pb.WorkerRequest, need_tokens: int, deadline: float | None
    ) -> tuple[Ticket, grpc.aio.UnaryStreamCall]:
        """A decode worker's confirmed reservation, and the Decode call that will stream the tokens."""
        retry = False
        for _ in range(MAX_RESERVE_ATTEMPTS):
            ticket = await self.scheduler.acquire(need_tokens, self._remaining(deadline, self.queue_timeout_s), retry)
            call: grpc.aio.UnaryStreamCall | None = None
            try:
                call = self.pool.decode_stub(ticket.address).Decode(
                    pb.DecodeRequest(request=request, kv_timeout_seconds=self.kv_timeout_s),
                    timeout=self._remaining(deadline),
                )
                msg = await call.read()
            except grpc.aio.AioRpcError as e:
                if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.scheduler.refused(ticket)  # another router filled it since the last report
                elif e.code() is grpc.StatusCode.UNAVAILABLE:
                    self.scheduler.failed(ticket)
                else:
                    self.scheduler.release(ticket)
                    raise _worker_error("decode", ticket.address, e) from None
                log.info("request %s: decode worker %s refused (%s); trying again", request.request_id,
                         ticket.address, e.code().name)
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

    async def _prefill(
        self, request: pb.WorkerRequest, decode_address: str, deadline: float | None, trace: _Trace
    ) -> pb.PrefillResponse:
        """Have a prefill worker compute the prompt's KV and push it to the decode worker. A worker that is full
        or unreachable is skipped for the next one."""
        tried: list[str] = []
        while True:
            try:
                ticket = self.scheduler.pick_prefill(exclude=tried)
            except Unavailable:
                if not tried:
                    raise
                raise Unavailable(f"every prefill worker refused request {request.request_id}") from None
            trace.prefill = ticket.address
            try:
                return await self.pool.prefill_stub(ticket.address).Prefill(
                    pb.PrefillRequest(request=request, decode_address=decode_address), timeout=self._remaining(deadline)
                )
            except grpc.aio.AioRpcError as e:
                if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.scheduler.refused(ticket)
                elif e.code() is grpc.StatusCode.UNAVAILABLE:
                    self.scheduler.failed(ticket)
                else:
                    raise _worker_error("prefill", ticket.address, e) from None
                log.info("request %s: prefill worker %s refused (%s); trying another", request.request_id,
                         ticket.address, e.code().name)
                tried.append(ticket.address)
            finally:
                self.scheduler.release(ticket)

    def _decode_message(self, read: asyncio.Future[Any], address: str) -> pb.DecodeResponse:
        try:
            msg = read.result()
        except grpc.aio.AioRpcError as e:
            raise _worker_error("decode", address, e) from None
        if msg is grpc.aio.EOF:
            raise Unavailable(f"decode worker {address} ended the stream before the request finished")
        assert isinstance(msg, pb.DecodeResponse)
        return msg

    async def _cancel_prefill(self, address: str, request_id: str) -> None:
        try:
            await self.pool.prefill_stub(address).Cancel(pb.CancelRequest(request_id=request_id), timeout=5.0)
        except grpc.aio.AioRpcError as e:
            log.debug("request %s: cancel on prefill worker %s failed: %s", request_id, address, e.code().name)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task, kept referenced until done; its error, if nobody awaits it, is only logged."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.debug("background task failed: %s", t.exception())

        task.add_done_callback(done)
        return task

    @staticmethod
    def _remaining(deadline: float | None, cap: float | None = None) -> float | None:
        if deadline is None:
            return cap
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError("the request's deadline passed")
        return left if cap is None else min(left, cap)


def _succeeded(task: asyncio.Task[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _worker_error(role: str, address: str, e: grpc.aio.AioRpcError) -> Exception:
    """A worker's gRPC error as the exception the router's APIs map back to a status."""
    code, details = e.code(), e.details() or e.code().name
    where = f"{role} worker {address}: {details}"
    if code is grpc.StatusCode.INVALID_ARGUMENT:  # the router checked what it could, the worker the rest
        field, sep, message = details.partition(": ")  # InvalidRequestError's text is "field: message"
        return InvalidRequestError(field, message) if sep and field.isidentifier() else ValueError(details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(where, retry_after_s=1.0)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(where)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(where)
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFound(where)
    return ServiceError(where)
