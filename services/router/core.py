"""The router's core, free of its public transports: tokenize and validate a request, then serve it through one
attempt after another (attempt.py: reserve a decode row, prefill, stream) until one finishes it, relaying its
tokens and text (text.py) as they come and logging it as one JSON line at the end (trace.py). Workers know a request
by an id the router makes for it, never by the client's (which clients see and choose). The gRPC API
(grpc_api.py) and the HTTP API (http_api.py) are thin layers over Router.generate.

A request that ends early (client gone, cancelled, an error on either worker) is stopped everywhere as its
attempt closes. One whose worker dies, drains or loses its KV is resumed by another attempt from the tokens
already streamed, up to --max-retries times.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from baton.engine.models import DEFAULT_MODEL, resolve_model_path
from baton.engine.request import FinishReason, SamplingParams, is_unicode
from baton.engine.sampler import check_choices, choice_seed
from baton.engine.spec import ModelSpec
from baton.errors import InvalidRequestError, Unavailable
from baton.metrics import RouterMetrics
from baton.rpc.convert import finish_from_proto, logprobs_from_proto, params_to_proto, prompt_logprobs_from_proto
from baton.v1 import baton_pb2 as pb
from services.router.attempt import Attempt, Background, Recoverable, resumed_request
from services.router.pool import WorkerPool
from services.router.scheduler import Scheduler
from services.router.served import ServedModels
from services.router.streams import merge
from services.router.text import Delta, TextStream, TokenTexts
from services.router.trace import Trace

log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 256
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # developer is taken as system


def chat_roles(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with their roles checked (InvalidRequestError naming the message) and developer as system."""
    for i, m in enumerate(messages):
        if m["role"] not in CHAT_ROLES:
            raise InvalidRequestError(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


@dataclass
class _Choice:
    """One choice of a request as the router relays it: its text so far and the tokens it streamed."""

    index: int
    text: TextStream
    sent: list[int] = field(default_factory=list)  # relayed to the client: what another attempt resumes from
    finished: bool = False


class Router:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model_name: str,
        spec: ModelSpec,
        pool: WorkerPool,
        kv_timeout_s: float = 30.0,
        queue_timeout_s: float | None = None,
        max_retries: int = 3,
        served: ServedModels | None = None,
        local_prefill_tokens: int = 0,
    ) -> None:
        self.tokenizer, self.model_name = tokenizer, model_name
        self.token_texts = TokenTexts(tokenizer)  # each token's own text and bytes (logprobs, echo)
        # the names clients may ask for (the `model` of a request; served.py): by default model_name alone
        self.served = served or ServedModels((model_name,))
        self.spec = spec  # the model's limits, from its config alone
        # No token is longer than the longest vocabulary entry: a text over this many characters cannot fit the
        # context, and is refused before the tokenizer spends time on it (which would stall every request).
        self.max_prompt_chars = spec.max_context * max((len(t) for t in tokenizer.get_vocab()), default=64)
        self.pool = pool
        self.kv_timeout_s, self.queue_timeout_s = kv_timeout_s, queue_timeout_s
        self.max_retries = max_retries  # recoveries (new attempts, prefills moved) allowed per request
        self.local_prefill_tokens = local_prefill_tokens  # prompts this short are prefilled by the decode worker
        self._active: set[str] = set()
        self._background = Background()
        self.metrics = RouterMetrics()
        self.metrics.track(running=lambda: len(self._active), waiting=lambda: self.pool.scheduler.queued)

    @classmethod
    def load(cls, model: str, pool: WorkerPool, served_names: Sequence[str] | None = None, **kwargs: Any) -> Router:
        """A router for a model: its tokenizer and config only (the router never loads weights). It serves the
        model under `served_names`, or by default under `model` and the name of its local directory."""
        path = resolve_model_path(model)
        spec = ModelSpec.from_config(AutoConfig.from_pretrained(path))
        local = model == DEFAULT_MODEL or Path(model).is_dir()  # else fetched from the Hub: a snapshot's hash
        served = (ServedModels.of(served_names) if served_names
                  else ServedModels.for_model(model, path if local else None))
        return cls(AutoTokenizer.from_pretrained(path), model, spec, pool, served=served, **kwargs)

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
        self._background.cancel_all()
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
                                            f"{self.spec.max_context} tokens")

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat as the model's template writes it, ending with the assistant's turn."""
        if not (
            isinstance(messages, list)
            and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
        ):
            raise InvalidRequestError("messages", "must be a non-empty list of objects with a role and a content")
        messages = chat_roles(messages)
        self._check_chars("messages", sum(len(str(m.get("content") or "")) for m in messages))
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # the template decides what a chat may hold (jinja errors, ValueError ...)
            raise InvalidRequestError("messages", f"chat template failed: {e}") from e
        if not is_unicode(text):
            raise InvalidRequestError("messages", "must be valid Unicode (a message holds a lone surrogate)")
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # the template wrote the special tokens

    def validate(self, request_id: str, prompt_ids: list[int], params: SamplingParams, n: int = 1) -> None:
        """Raises InvalidRequestError naming the field when the request cannot be served by this model."""
        if not request_id or len(request_id) > MAX_REQUEST_ID_CHARS:
            raise InvalidRequestError("request_id", f"must be 1 to {MAX_REQUEST_ID_CHARS} characters")
        if not request_id.isprintable():  # it reaches the logs: no newline, NUL or other control character
            raise InvalidRequestError("request_id", "must be printable characters (no newline or control character)")
        if request_id in self._active:
            raise InvalidRequestError("request_id", f"request id {request_id!r} is already in use")
        if not prompt_ids:
            raise InvalidRequestError("prompt", "must not be empty")
        check_choices(n)
        self.spec.check_request(prompt_ids, params.max_new_tokens, token_fields=params.token_fields)

    # ---- generation --------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None,
        n: int = 1,
    ) -> AsyncGenerator[Delta, None]:
        """Stream a request's tokens, one attempt after another (attempt.py) until one finishes it. Stopping the
        iteration early (aclose, cancellation) cancels the request on its workers. `timeout`: seconds the whole
        request may take (the client's deadline).

        With n > 1: n choices (Delta.index), from one prefill that one decode worker splices into n rows (choice i
        sampling with choice_seed(seed, i)). Should that attempt fail, each unfinished choice goes on as a request
        of its own from the tokens it has streamed, exactly as one request resumes (attempt.py)."""
        trace = Trace(request_id, time.perf_counter(), len(prompt_ids), worker_id=uuid.uuid4().hex)
        try:
            self.validate(request_id, prompt_ids, params, n)
        except InvalidRequestError as e:
            trace.error = str(e)
            trace.log(self.metrics)
            raise
        self._active.add(request_id)
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        request = pb.WorkerRequest(request_id=trace.worker_id, prompt_ids=prompt_ids,
                                   parameters=params_to_proto(params), n=n if n > 1 else 0)
        choices = [_Choice(i, TextStream(self.tokenizer, params.stop)) for i in range(n)]
        try:
            if n == 1:
                async for delta in self._attempts(request, params, deadline, trace, choices[0]):
                    yield delta
            else:
                async for delta in self._choices(request, params, deadline, trace, choices):
                    yield delta
        except BaseException as e:
            if trace.finish_reason is None:  # (closing the stream after its last event is not an error)
                trace.error = "cancelled" if isinstance(e, (asyncio.CancelledError, GeneratorExit)) else str(e)
            raise
        finally:
            self._active.discard(request_id)
            trace.log(self.metrics)

    def _attempt(self, request: pb.WorkerRequest, params: SamplingParams, deadline: float | None,
                 trace: Trace) -> Attempt:
        rows = max(1, request.n)
        return Attempt(self.pool, request, rows * (len(request.prompt_ids) + params.max_new_tokens), deadline, trace,
                       self.metrics, self._background, kv_timeout_s=self.kv_timeout_s,
                       queue_timeout_s=self.queue_timeout_s, max_retries=self.max_retries,
                       local_prefill_tokens=self.local_prefill_tokens)

    async def _start(self, attempt: Attempt, trace: Trace) -> None:
        await attempt.start(resuming=bool(trace.recoveries))
        trace.decode = attempt.address
        if trace.queue_s is None:
            trace.queue_s = time.perf_counter() - trace.start

    async def _attempts(self, request: pb.WorkerRequest, params: SamplingParams, deadline: float | None,
                        trace: Trace, choice: _Choice) -> AsyncGenerator[Delta, None]:
        """One choice (the request's one) through attempts until one finishes it, resuming from its tokens."""
        while len(choice.sent) < params.max_new_tokens:  # (a worker ends a request with its last token: a guard)
            attempt = self._attempt(resumed_request(request, choice.sent) if choice.sent else request, params,
                                    deadline, trace)
            try:
                await self._start(attempt, trace)
                async with contextlib.aclosing(attempt.messages()) as messages:
                    async for msg in messages:
                        delta = self._delta(msg, choice, params, len(request.prompt_ids), trace)
                        yield delta
                        if delta.finish_reason is not None:
                            return
            except Recoverable as e:
                self._recover(trace.id, str(e), choice.sent, trace)
            finally:
                attempt.close()
        trace.finish_reason = FinishReason.LENGTH.value
        yield Delta([], choice.text.finish(None), FinishReason.LENGTH, len(request.prompt_ids), len(choice.sent),
                    index=choice.index)

    async def _choices(self, request: pb.WorkerRequest, params: SamplingParams, deadline: float | None,
                       trace: Trace, choices: list[_Choice]) -> AsyncGenerator[Delta, None]:
        """n choices from one prefill on one decode worker; after a failure, the unfinished ones on their own."""
        attempt = self._attempt(request, params, deadline, trace)
        try:
            await self._start(attempt, trace)
            async with contextlib.aclosing(attempt.messages()) as messages:
                async for msg in messages:
                    yield self._delta(msg, choices[msg.index], params, len(request.prompt_ids), trace)
            return
        except Recoverable as e:
            self._recover(trace.id, str(e), [t for c in choices for t in c.sent], trace)
        finally:
            attempt.close()
        own = []
        for c in choices:
            if c.finished:
                continue
            p = replace(params, seed=choice_seed(params.seed, c.index),
                        prompt_logprobs=params.prompt_logprobs if c.index == 0 else None)
            alone = pb.WorkerRequest(request_id=f"{request.request_id}/{c.index}", prompt_ids=request.prompt_ids,
                                     parameters=params_to_proto(p))
            own.append(contextlib.aclosing(self._attempts(alone, p, deadline, trace, c)))
        async with contextlib.AsyncExitStack() as stack:
            streams = [await stack.enter_async_context(s) for s in own]
            async for _, delta in merge(streams):
                yield delta

    def _delta(self, msg: pb.DecodeResponse, choice: _Choice, params: SamplingParams, prompt_len: int,
               trace: Trace) -> Delta:
        """A decode worker's message as the Delta of its choice (text, logprobs; usage with its finish)."""
        ids = list(msg.token_ids)
        trace.tokens(len(ids), self.metrics)
        first = not choice.sent
        choice.sent += ids
        reason = finish_from_proto(msg.finish_reason)
        delta = Delta(ids, choice.text.add(ids), logprobs=[logprobs_from_proto(m) for m in msg.logprobs],
                      index=choice.index)
        if first and params.prompt_logprobs is not None and choice.index == 0:  # they come with its first token
            delta.prompt_logprobs = prompt_logprobs_from_proto(msg.prompt_logprobs) or [None] * prompt_len
        if reason is not None:
            choice.finished = True
            trace.finish_reason = reason.value
            stop_text = msg.stop_text if msg.HasField("stop_text") else None
            delta.text += choice.text.finish(stop_text)
            delta.finish_reason = reason
            delta.prompt_tokens, delta.completion_tokens = prompt_len, len(choice.sent)
        return delta

    def _recover(self, request_id: str, failure: str, sent: list[int], trace: Trace) -> None:
        """An attempt failed in a way another can repair: count it, or give up past max_retries."""
        trace.recoveries.append(failure)
        if len(trace.recoveries) > self.max_retries:
            self.metrics.recovered("gave_up")
            raise Unavailable(f"request {request_id} failed {len(trace.recoveries)} times: "
                              + "; ".join(trace.recoveries)) from None
        self.metrics.recovered("resumed" if sent else "restarted")
        log.warning("request %s: %s; %s on another decode worker (retry %d of %d)", request_id, failure,
                    f"resuming after {len(sent)} tokens" if sent else "starting again", len(trace.recoveries),
                    self.max_retries)
