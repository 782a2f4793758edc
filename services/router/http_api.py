"""The router's OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health.

A thin transport over the router core (anything with the `Backend` shape below): this file turns JSON into
prompt token ids and SamplingParams, and the core's StreamEvents back into OpenAI's response objects, either
whole or as server-sent events (`data: {json}` chunks ending in `data: [DONE]`).

Compatibility choices:
- Fields OpenAI clients send that change nothing here (`user`, `metadata`, `n: 1`, `logprobs: null`, ...) are
  accepted and ignored; a value Baton cannot honour (`n: 2`, `echo: true`, `logprobs: 5`, tools ...) is refused
  with a 400 naming the field, never silently dropped.
- Defaults follow OpenAI, not the engine: temperature 1, max_tokens 16 for completions; for chat, 1024 or the
  rest of the context if less (see CHAT_DEFAULT_MAX_TOKENS). Extensions: top_k, repetition_penalty,
  stop_token_ids, ignore_eos.
- Any `model` name is accepted; responses name the one model served.
- Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad input (param = field),
  413 body over the limit, 429 queue full (with Retry-After), 503 no worker, 500 anything else. An error after
  a stream has started arrives as one last `data: {"error": ...}` event.
- A client that disconnects cancels its request (the core's generator is closed).
- finish_reason is "stop", "length", or "cancelled" when the system (not the client) ended a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baton.engine.request import FinishReason, InvalidRequestError, SamplingParams
from baton.rpc.server import Overloaded, ServiceError

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BODY_BYTES = 4 << 20
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Chat without max_tokens: this many, or the rest of the context if less. Not the whole context, as OpenAI
# does: a decode worker reserves KV for prompt + max_tokens, so a large default would cut its concurrency.
CHAT_DEFAULT_MAX_TOKENS = 1024
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


# ---- what the API needs from the router core -------------------------------------------------------------
class Event(Protocol):
    """One step of a generation (services.router.core.StreamEvent)."""

    @property
    def text(self) -> str: ...  # text delta
    @property
    def finish_reason(self) -> FinishReason | None: ...  # set on the last event, with the usage
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...


class Backend(Protocol):
    """The router core (services.router.core.Router) as this API uses it."""

    model_name: str
    max_context: int

    def encode_prompt(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...
    def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Event]: ...


# ---- errors ----------------------------------------------------------------------------------------------
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
                504: "timeout_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    @classmethod
    def invalid(cls, param: str | None, message: str) -> ApiError:
        return cls(400, f"{param}: {message}" if param else message, param)

    def body(self) -> dict[str, Any]:
        kind = _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def api_error(exc: BaseException, params: dict[str, str]) -> ApiError:
    """The API error an exception from parsing or from the core stands for; `params` renames engine fields to
    this endpoint's (max_new_tokens -> max_tokens)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidRequestError):
        param = params.get(exc.field, exc.field)
        message = str(exc).removeprefix(f"{exc.field}: ")
        return ApiError(400, f"{param}: {message}", param)
    if isinstance(exc, ValueError):  # a worker's INVALID_ARGUMENT, relayed by the core as "field: message"
        m = re.match(r"([a-z_]+): ", str(exc))
        if m is None:
            return ApiError(400, str(exc))
        name = params.get(m.group(1), m.group(1))
        return ApiError(400, f"{name}: {str(exc)[m.end():]}", name)
    if isinstance(exc, Overloaded):
        return ApiError(429, str(exc), code="overloaded", retry_after_s=exc.retry_after_s or 1.0)
    if isinstance(exc, ServiceError):
        return ApiError(exc.http_status, str(exc))
    if isinstance(exc, TimeoutError):
        return ApiError(504, str(exc) or "timed out")
    log.error("internal error", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")


# ---- request bodies --------------------------------------------------------------------------------------
# Strict: "0.5" is not a number and true is not 1. Unknown fields are kept (extra="allow") and ignored.
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool | None = None


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension; -1 or 0: off
    repetition_penalty: float | None = None  # extension
    seed: int | None = None
    stop: Any = None  # a string or a list of strings
    stop_token_ids: list[int] | None = None  # extension
    ignore_eos: bool | None = None  # extension
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


class CompletionRequest(_Body):
    prompt: Any  # a string or a list of token ids (or either, alone in a list)
    max_tokens: int | None = None
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: Any = None  # a string or a list of {"type": "text", "text": ...} parts


class ChatCompletionRequest(_Body):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None


# Fields Baton cannot honour, with the values that ask for nothing (and so are accepted).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
}


def _refuse_unsupported(body: _Body) -> None:
    for name, ok in NEUTRAL.items():
        if name in type(body).model_fields and getattr(body, name) not in ok:
            raise ApiError.invalid(name, f"{getattr(body, name)!r} is not supported by Baton")
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError.invalid("response_format", "only {\"type\": \"text\"} is supported by Baton")


def sampling_params(body: _Body, max_new_tokens: int) -> SamplingParams:
    """Raises InvalidRequestError naming the engine's field (see api_error for the renaming)."""
    stop = body.stop
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ApiError.invalid("stop", "must be a string or a list of strings")
    top_k = 0 if body.top_k in (None, -1) else body.top_k
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=top_k,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed,
        stop=tuple(s for s in stop if s),  # OpenAI ignores empty stop strings
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=bool(body.ignore_eos),
    )


def completion_prompt(router: Backend, prompt: Any) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError.invalid("prompt", "must not be empty")
        return router.encode_prompt(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if min(prompt) < 0:
            raise ApiError.invalid("prompt", "token ids must be >= 0")
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise ApiError.invalid("prompt", "one prompt per request; send several requests for several prompts")
    raise ApiError.invalid("prompt", "must be a non-empty string or a non-empty list of token ids")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them: a role and a text content."""
    if not messages:
        raise ApiError.invalid("messages", "must not be empty")
    out = []
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise ApiError.invalid(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}")
        content = m.content
        if content is None:
            content = ""
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError.invalid(f"messages[{i}].content[{j}]", "only text content parts are supported")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ApiError.invalid(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


# ---- one generation ------------------------------------------------------------------------------------
@dataclass
class Job:
    """A parsed request, ready for the core."""

    id: str
    kind: str  # "completion" or "chat"
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    field_names: dict[str, str]  # engine field -> this request's field, for error messages
    created: int = field(default_factory=lambda: int(time.time()))

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}


def _usage(event: Event) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _finish(event: Event) -> str | None:
    return None if event.finish_reason is None else str(event.finish_reason.value)


def whole_response(job: Job, text: str, last: Event) -> dict[str, Any]:
    if job.kind == "completion":
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(last)}
        return {**job.head("text_completion"), "choices": [choice], "usage": _usage(last)}
    message = {"role": "assistant", "content": text, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(last)}
    return {**job.head("chat.completion"), "choices": [choice], "usage": _usage(last)}


def stream_chunks(job: Job, event: Event, first: bool) -> list[dict[str, Any]]:
    """The SSE chunks for one core event, as OpenAI sends them: (chat only) a first chunk with the role, a
    chunk per text delta, a last chunk with the finish reason and no text; then, if asked, one with the usage."""
    chat = job.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(payload: dict[str, Any], finish: str | None) -> dict[str, Any]:
        choice = {"index": 0, **payload, "logprobs": None, "finish_reason": finish}
        extra = {"usage": None} if job.include_usage else {}
        return {**job.head(obj), "choices": [choice], **extra}

    chunks = []
    if chat and first:
        chunks.append(chunk({"delta": {"role": "assistant", "content": ""}}, None))
    if event.text:
        chunks.append(chunk({"delta": {"content": event.text}} if chat else {"text": event.text}, None))
    finish = _finish(event)
    if finish is not None:
        chunks.append(chunk({"delta": {}} if chat else {"text": ""}, finish))
        if job.include_usage:
            chunks.append({**job.head(obj), "choices": [], "usage": _usage(event)})
    return chunks


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_gone(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    gone = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _close(events: AsyncIterator[Event]) -> None:
    aclose = getattr(events, "aclose", None)  # an async generator: run its cleanup (cancels the request)
    if aclose is not None:
        await aclose()


async def run(router: Backend, job: Job, request: Request) -> Response:
    """Run the job on the core. Errors before its first event become an HTTP error status; a stream answers
    as soon as the first event is there."""
    t0 = time.perf_counter()
    events = router.generate(job.id, job.prompt_ids, job.params)
    handed_off = False
    try:
        first = await _unless_gone(request, anext(events))
        if job.stream:
            handed_off = True
            return StreamingResponse(_stream(job, first, events, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, last = await _unless_gone(request, _collect(first, events))
    except ClientGone:
        log.debug("%s: client disconnected; cancelled", job.id)
        return Response(status_code=499)
    finally:
        if not handed_off:
            await _close(events)
    _log_done(job, last, t0)
    return JSONResponse(whole_response(job, text, last))


async def _collect(first: Event, events: AsyncIterator[Event]) -> tuple[str, Event]:
    parts, last = [first.text], first
    while last.finish_reason is None:
        try:
            last = await anext(events)
        except StopAsyncIteration:
            log.warning("the core's stream ended without a finish reason")
            break
        parts.append(last.text)
    return "".join(parts), last


async def _stream(job: Job, first: Event, events: AsyncIterator[Event], t0: float) -> AsyncIterator[str]:
    """The SSE body. When the client goes away Starlette cancels the response task; the cancellation runs
    through the core's generator, and _close ends it in every case."""
    try:
        event, is_first = first, True
        while True:
            for chunk in stream_chunks(job, event, is_first):
                yield _sse(chunk)
            if event.finish_reason is not None:
                _log_done(job, event, t0)
                break
            event, is_first = await anext(events), False
    except StopAsyncIteration:
        log.warning("%s: the core's stream ended without a finish reason", job.id)
    except asyncio.CancelledError:
        log.debug("%s: client disconnected; cancelled", job.id)
        raise
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        yield _sse(api_error(e, job.field_names).body())
    finally:
        await _close(events)
    yield "data: [DONE]\n\n"


def _log_done(job: Job, last: Event, t0: float) -> None:
    """Debug only: the core logs one line per request already (with this id)."""
    log.debug("%s: %s%s prompt=%d completion=%d finish=%s %.3fs", job.id, job.kind, " stream" if job.stream else "",
             last.prompt_tokens, last.completion_tokens, _finish(last), time.perf_counter() - t0)


# ---- the app -------------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: reads a request body whole, refusing one over `limit` bytes with 413 before anything
    parses it, then replays it to the app (and passes later messages, such as http.disconnect, through)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = ApiError(413, f"request body is over the limit of {self.limit} bytes", code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            await too_big.response()(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # disconnected before the body arrived
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                await too_big.response()(scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _param(loc: tuple[int | str, ...]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def create_app(router: Backend, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="Baton", summary="OpenAI-compatible API of the Baton router", version="1")
    app.state.router = router
    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> Response:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = tuple(err.get("loc", ()))
        if err.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {err.get('msg', '')}", code="invalid_json").response()
        param = _param(loc)
        if param is None and err.get("type") in ("model_type", "model_attributes_type", "dict_type"):
            return ApiError(400, "the body must be a JSON object").response()
        return ApiError.invalid(param, str(err.get("msg", "invalid value"))).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return ApiError(exc.status_code, str(exc.detail)).response()

    async def answer(job_of: Callable[[], Job], request: Request, names: dict[str, str]) -> Response:
        try:
            return await run(router, job_of(), request)
        except Exception as e:  # noqa: BLE001 - every error becomes an OpenAI error object
            err = api_error(e, names)
            if err.status < 500:
                log.info("%s %s: %s", request.method, request.url.path, err.message)
            return err.response()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        names = {"max_new_tokens": "max_tokens", "input_ids": "prompt"}

        def job() -> Job:
            _refuse_unsupported(body)
            prompt_ids = completion_prompt(router, body.prompt)
            max_new = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
            _check_context(router, len(prompt_ids), max_new, "max_tokens")
            return Job(f"cmpl-{uuid.uuid4().hex}", "completion", router.model_name, prompt_ids,
                       sampling_params(body, max_new), bool(body.stream), _include_usage(body), names)

        return await answer(job, request, names)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        names = {"max_new_tokens": max_field, "input_ids": "messages", "prompt": "messages"}

        def job() -> Job:
            _refuse_unsupported(body)
            prompt_ids = router.encode_chat(chat_messages(body.messages))
            max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            if max_new is None:
                max_new = min(CHAT_DEFAULT_MAX_TOKENS, router.max_context - len(prompt_ids))
                if max_new < 1:
                    raise ApiError.invalid("messages", f"the conversation ({len(prompt_ids)} tokens) fills the "
                                                       f"model's context of {router.max_context} tokens")
            _check_context(router, len(prompt_ids), max_new, max_field)
            return Job(f"chatcmpl-{uuid.uuid4().hex}", "chat", router.model_name, prompt_ids,
                       sampling_params(body, max_new), bool(body.stream), _include_usage(body), names)

        return await answer(job, request, names)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": router.model_name, "object": "model", "created": 0, "owned_by": "baton",
                 "max_model_len": router.max_context}
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _include_usage(body: _Body) -> bool:
    return bool(body.stream and body.stream_options is not None and body.stream_options.include_usage)


def _check_context(router: Backend, prompt_len: int, max_new: int, name: str) -> None:
    if max_new >= 1 and prompt_len + max_new > router.max_context:
        raise ApiError.invalid(name, f"the prompt ({prompt_len} tokens) + {name} ({max_new}) exceeds the model's "
                                     f"context of {router.max_context} tokens")
