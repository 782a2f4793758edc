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
Decode call is cancelled (D drops the row) and a prefill still pending is cancelled on P. A request whose worker
dies, drains or loses its KV is resumed on others from the tokens already streamed (resume.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from baton.engine.models import resolve_model_path
from baton.engine.request import FinishReason, InvalidRequestError, SamplingParams, check_model_limits, is_unicode
from baton.metrics import RouterMetrics
from baton.rpc.convert import finish_from_proto, params_to_proto
from baton.rpc.server import NotFound, Overloaded, ServiceError, Unavailable
from baton.v1 import baton_pb2 as pb
from services.router.pool import WorkerPool
from services.router.resume import KV_PUSH_FAILED, Attempt, Recoverable, RecoveryStats, resumed_request
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
    last_token_at: float | None = None
    queue_s: float | None = None  # until a decode worker confirmed a row
    finish_reason: str | None = None
    error: str | None = None
    recoveries: list[str] = field(default_factory=list)  # what failed, each time another attempt took over

    def tokens(self, n: int, metrics: RouterMetrics) -> None:
        """n new tokens arrived in one message."""
        if not n:
            return
        now = time.perf_counter()
        self.completion_tokens += n
        metrics.tokens(n, None if self.last_token_at is None else now - self.last_token_at)
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    @property
    def outcome(self) -> str:
        if self.finish_reason is not None:
            return self.finish_reason
        return "cancelled" if self.error == "cancelled" else "error"

    def log(self, metrics: RouterMetrics) -> None:
        """One JSON line for the request, and its latencies in the metrics."""
        e2e = time.perf_counter() - self.start
        ttft = None if self.first_token_at is None else self.first_token_at - self.start
        line: dict[str, Any] = {
            "request_id": self.id,
            "decode_worker": self.decode,
            "prefill_worker": self.prefill,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "ttft_s": None if ttft is None else round(ttft, 4),
            "e2e_s": round(e2e, 4),
            "queue_s": None if self.queue_s is None else round(self.queue_s, 4),
        }
        if self.error is not None:
            line["error"] = self.error
        if self.recoveries:
            line["recoveries"] = self.recoveries
        log.info("%s", json.dumps(line), extra={"fields": line})
        metrics.finished(self.outcome, self.prompt_tokens, e2e, ttft, self.queue_s)


class Router:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        max_context: int,
        vocab_size: int,
        pool: WorkerPool,
        kv_timeout_s: float = 30.0,
        queue_timeout_s: float | None = None,
        max_retries: int = 3,
    ) -> None:
        self.tokenizer, self.model_name = tokenizer, model_name
        self.max_context, self.vocab_size = max_context, vocab_size
        # No token is longer than the longest vocabulary entry: a text over this many characters cannot fit the
        # context, and is refused before the tokenizer spends time on it (which would stall every request).
        self.max_prompt_chars = max_context * max((len(t) for t in tokenizer.get_vocab()), default=64)
        self.pool = pool
        self.kv_timeout_s, self.queue_timeout_s = kv_timeout_s, queue_timeout_s
        self.max_retries = max_retries  # recoveries (new attempts, prefills moved) allowed per request
        self.recovery = RecoveryStats()
        self._active: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self.metrics = RouterMetrics()
        self.metrics.track(running=lambda: len(self._active), waiting=lambda: self.pool.scheduler.queued)

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
        self._check_chars("prompt", len(text))
        if not is_unicode(text):
            raise InvalidRequestError("prompt", "must be valid Unicode (it holds a lone surrogate)")
        return list(self.tokenizer.encode(text))

    def _check_chars(self, name: str, chars: int) -> None:
        if chars > self.max_prompt_chars:
            raise InvalidRequestError(name, f"{chars} characters cannot fit the model's context of "
                                            f"{self.max_context} tokens")

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat as the model's template writes it, ending with the assistant's turn."""
        if not (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        ):
            raise InvalidRequestError("messages", "must be a non-empty list of objects with a role and a content")
        self._check_chars("messages", sum(len(str(m.get("content") or "")) for m in messages))
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template decides what a chat may hold (jinja errors, ValueError ...)
            raise InvalidRequestError("messages", f"chat template failed: {e}") from e
        if not is_unicode(text):
            raise InvalidRequestError("messages", "must be valid Unicode (a message holds a lone surrogate)")
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
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidRequestError("stop_token_ids", f"token id {bad[0]} is outside the vocabulary "
                                                        f"[0, {self.vocab_size})")

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
            trace.log(self.metrics)
            raise
        self._active.add(request_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        request = pb.WorkerRequest(request_id=request_id, prompt_ids=prompt_ids, parameters=params_to_proto(params))
        text = TextStream(self.tokenizer, params.stop)
        sent: list[int] = []  # tokens relayed to the client: what another attempt resumes from (resume.py)
        attempt: Attempt | None = None
        finished = False
        try:
            while True:
                if len(sent) >= params.max_new_tokens:  # (a worker ends a request with its last token: a guard)
                    finished = True
                    trace.finish_reason = FinishReason.LENGTH.value
                    yield StreamEvent([], text.finish(None), FinishReason.LENGTH, len(prompt_ids), len(sent))
                    return
                attempt = Attempt(self, resumed_request(request, sent) if sent else request,
                                  len(prompt_ids) + params.max_new_tokens, deadline, trace)
                try:
                    await attempt.start(first=bool(trace.recoveries))
                    trace.decode = attempt.address
                    if trace.queue_s is None:
                        trace.queue_s = time.perf_counter() - trace.start
                    self.metrics.chose("decode", attempt.address)
                    while True:
                        msg = await attempt.next()
                        ids = list(msg.token_ids)
                        trace.tokens(len(ids), self.metrics)
                        sent += ids
                        reason = finish_from_proto(msg.finish_reason)
                        if reason is None or reason is FinishReason.CANCELLED:
                            if ids:
                                yield StreamEvent(ids, text.add(ids))
                            if reason is FinishReason.CANCELLED:  # not asked for by this router: the worker gave up
                                raise Recoverable(f"decode worker {attempt.address} cancelled the request")
                            continue
                        delta = text.add(ids) + text.finish(msg.stop_text if msg.HasField("stop_text") else None)
                        finished = attempt.finished = True
                        trace.finish_reason = reason.value
                        yield StreamEvent(ids, delta, reason, len(prompt_ids), trace.completion_tokens)
                        return
                except Recoverable as e:
                    self._recover(request_id, str(e), sent, trace)
                finally:
                    attempt.close()
        except BaseException as e:
            if not finished:  # (closing the stream after its last event is not an error)
                trace.error = "cancelled" if isinstance(e, (asyncio.CancelledError, GeneratorExit)) else str(e)
            raise
        finally:
            self._active.discard(request_id)
            trace.log(self.metrics)

    def _recover(self, request_id: str, failure: str, sent: list[int], trace: _Trace) -> None:
        """An attempt failed in a way another can repair: count it, or give up past max_retries."""
        trace.recoveries.append(failure)
        if len(trace.recoveries) > self.max_retries:
            self.recovery.gave_up += 1
            raise Unavailable(f"request {request_id} failed {len(trace.recoveries)} times: "
                              + "; ".join(trace.recoveries)) from None
        if sent:
            self.recovery.resumed += 1
        else:
            self.recovery.restarted += 1
        log.warning("request %s: %s; %s on another decode worker (retry %d of %d)", request_id, failure,
                    f"resuming after {len(sent)} tokens" if sent else "starting again", len(trace.recoveries),
                    self.max_retries)

    async def _reserve(
        self, request: pb.WorkerRequest, need_tokens: int, deadline: float | None, first: bool = False
    ) -> tuple[Ticket, grpc.aio.UnaryStreamCall]:
        """A decode worker's confirmed reservation, and the Decode call that will stream the tokens. `first`:
        wait at the head of the queue."""
        retry = first
        for _ in range(MAX_RESERVE_ATTEMPTS):
            wait = self._remaining(deadline, self.queue_timeout_s)
            try:
                ticket = await self.scheduler.acquire(need_tokens, wait, retry)
            except Overloaded:
                if deadline is not None and asyncio.get_running_loop().time() >= deadline - 0.01:
                    raise TimeoutError("the request's deadline passed while it waited for a decode worker") from None
                raise
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
            self.metrics.chose("prefill", ticket.address)
            try:
                return await self.pool.prefill_stub(ticket.address).Prefill(
                    pb.PrefillRequest(request=request, decode_address=decode_address), timeout=self._remaining(deadline)
                )
            except grpc.aio.AioRpcError as e:
                if KV_PUSH_FAILED in (e.details() or ""):  # the decode side failed: another attempt, another row
                    raise Recoverable(f"prefill worker {ticket.address}: {e.details()}") from None
                if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.scheduler.refused(ticket)
                elif e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):  # died or shut down
                    self.scheduler.failed(ticket)
                    self.recovery.prefill_retries += 1
                    trace.recoveries.append(f"prefill worker {ticket.address}: {e.details() or e.code().name}")
                    if len(trace.recoveries) > self.max_retries:
                        raise Unavailable(f"request {request.request_id} failed {len(trace.recoveries)} times: "
                                          + "; ".join(trace.recoveries)) from None
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
