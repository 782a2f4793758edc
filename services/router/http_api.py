"""The router's OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health, and
its Prometheus metrics at /metrics.

A thin transport over the router core (anything with the `Backend` shape below): this file turns JSON into
prompt token ids and SamplingParams, and the core's Deltas (services/router/text.py) back into OpenAI's response
objects, either whole or as server-sent events (`data: {json}` chunks ending in `data: [DONE]`).

Compatibility choices:
- Fields OpenAI clients send that change nothing here (`user`, `metadata`, `store`, ...) are accepted and
  ignored; a value Baton cannot honour (`best_of: 2`, `suffix`, tools ...) is refused with a 400 naming the field,
  never silently dropped.
- Defaults follow OpenAI, not the engine: temperature 1, max_tokens 16 for completions; for chat, 1024 or the
  rest of the context if less (see CHAT_DEFAULT_MAX_TOKENS). Extensions: top_k, repetition_penalty,
  stop_token_ids, ignore_eos, min_tokens, timeout (seconds the whole request may take: then 504, or mid-stream an
  error event, and the request is stopped on its workers), return_token_ids (as vLLM: each choice, each stream
  chunk, carries its `token_ids`, and the first its `prompt_token_ids`).
- `model` must be one of the names the router serves (services/router/served.py: --served-model-name, by
  default the --model value and its directory's name; /v1/models lists them), else 404 with code
  `model_not_found`, as OpenAI and vLLM answer. A request without `model` is served by the model all the same.
  Responses name the model as the request did (the first served name when it gave none).
- Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 bad input (param = field),
  401 missing or wrong API key (when the router has one; /health and /metrics stay open), 404 unknown model
  (param `model`, code `model_not_found`), 413 body over the limit, 429 queue full (with Retry-After), 503 no
  worker, 504 timeout passed, 500 anything else. An error after a stream has started arrives as one last
  `data: {"error": ...}` event.
- A client that disconnects cancels its request (the core's generator is closed).
- finish_reason is "stop", "length", or "cancelled" when the system (not the client) ended a request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from baton.engine.logprobs import TokenLogprobs
from baton.engine.request import SamplingParams
from baton.engine.sampler import check_choices
from baton.metrics import RouterMetrics
from baton.rpc.server import bearer_ok
from services.router.openai_logprobs import CompletionLogprobs, chat_logprobs
from services.router.openai_schema import (
    CHAT_DEFAULT_MAX_TOKENS,
    COMPLETION_DEFAULT_MAX_TOKENS,
    MAX_BODY_BYTES,
    ApiError,
    Backend,
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIBody,
    Prompt,
    api_error,
    chat_messages,
    completion_prompts,
    refuse_unsupported,
    request_timeout,
    sampling_params,
)
from services.router.streams import merge
from services.router.text import Delta, TokenTexts

log = logging.getLogger(__name__)
T = TypeVar("T")

# ---- one generation ------------------------------------------------------------------------------------
@dataclass
class Job:
    """A parsed request, ready for the core: one choice per prompt (several prompts: one choice each, in order)."""

    id: str
    kind: str  # "completion" or "chat"
    model: str
    prompts: list[Prompt]
    params: SamplingParams
    stream: bool
    include_usage: bool
    field_names: dict[str, str]  # engine field -> this request's field, for error messages
    timeout: float | None = None  # seconds the request may take
    created: int = field(default_factory=lambda: int(time.time()))
    echo: bool = False  # completions: the prompt (and, with logprobs, its logprobs) comes before the output
    echo_only: bool = False  # max_tokens 0 with echo: the prompt is scored, the one token computed is dropped
    n: int = 1  # choices per prompt, each prompt's from one prefill
    token_ids: bool = False  # return_token_ids: each choice carries its tokens' ids (and its prompt's, first)

    def head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def request_id(self, index: int) -> str:
        """The core's id of prompt `index`'s generation: the job's own when it has one prompt."""
        return self.id if len(self.prompts) == 1 else f"{self.id}-{index}"


class Choice:
    """One choice of a job as it is answered: its text and logprobs so far, in the job's shape. Choice index
    p * n + j is choice j of prompt p."""

    def __init__(self, job: Job, prompt: int, j: int, texts: TokenTexts,
                 prompt_lps: dict[int, list[TokenLogprobs | None]]) -> None:
        self.job, self.index, self.texts = job, prompt * job.n + j, texts
        self.prompt_index, self.prompt = prompt, job.prompts[prompt]
        self.prompt_lps = prompt_lps  # by prompt: its logprobs, as its first choice's first event brought them
        self.completion_lps = CompletionLogprobs(texts) if job.params.logprobs is not None else None
        self.started = False
        self.last: Delta | None = None  # the event with its finish reason

    def prompt_text(self) -> str:
        if self.prompt.text is not None:
            return self.prompt.text
        return b"".join(self.texts.bytes(t) for t in self.prompt.ids).decode("utf-8", errors="replace")

    def take(self, event: Delta) -> tuple[str, list[int], Any]:
        """The text, token ids and logprobs object an event adds to this choice (echo's prompt on the first); None
        when the choice carries no logprobs."""
        job, first = self.job, not self.started
        self.started = True
        if event.finish_reason is not None:
            self.last = event
        if event.prompt_logprobs is not None:
            self.prompt_lps[self.prompt_index] = event.prompt_logprobs
        text, tokens, lps = event.text, event.token_ids, event.logprobs
        if job.echo_only:
            text, tokens, lps = "", [], []
        prompt_lps: list[TokenLogprobs | None] = []
        if job.echo and first:
            text = self.prompt_text() + text
            if job.params.prompt_logprobs is not None:
                prompt_lps = self.prompt_lps.get(self.prompt_index) or [None] * len(self.prompt.ids)
        if job.params.logprobs is None:
            return text, tokens, None
        if job.kind == "chat":
            return text, tokens, chat_logprobs(self.texts, lps)
        assert self.completion_lps is not None
        prompt_part = self.prompt.ids if prompt_lps else []
        return text, tokens, self.completion_lps.part(list(prompt_part) + tokens, [*prompt_lps, *lps])

    @property
    def completion_tokens(self) -> int:
        return 0 if self.job.echo_only or self.last is None else self.last.completion_tokens


def choices_of(job: Job, texts: TokenTexts) -> list[list[Choice]]:
    """Per prompt, its n choices."""
    shared: dict[int, list[TokenLogprobs | None]] = {}
    return [[Choice(job, p, j, texts, shared) for j in range(job.n)] for p in range(len(job.prompts))]


def _usage(job: Job, choices: list[Choice]) -> dict[str, int]:
    """What was computed: each prompt once (its n choices share one prefill), each choice's output."""
    prompt = sum(len(p.ids) for p in job.prompts)
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(event: Delta | None) -> str | None:
    return None if event is None or event.finish_reason is None else str(event.finish_reason.value)


def whole_response(job: Job, choices: list[list[Choice]], events: list[list[Delta]]) -> dict[str, Any]:
    """events[p]: every event of prompt p's generation (its choices' events interleaved, by Delta.index)."""
    out = []
    for per_prompt, evs in zip(choices, events):
        for choice in per_prompt:
            taken = [choice.take(ev) for ev in evs if ev.index == choice.index % job.n]
            text = "".join(t for t, _, _ in taken)
            logprobs: Any = None
            if job.params.logprobs is not None:
                parts = [lp for _, _, lp in taken]
                logprobs = ({"content": [x for p in parts for x in p["content"]], "refusal": None}
                            if job.kind == "chat" else CompletionLogprobs.join(parts))
            finish = _finish(choice.last)
            if job.kind == "completion":
                one = {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": finish}
            else:
                message = {"role": "assistant", "content": text, "refusal": None}
                one = {"index": choice.index, "message": message, "logprobs": logprobs, "finish_reason": finish}
            if job.token_ids:
                one.update(prompt_token_ids=list(choice.prompt.ids), token_ids=[t for _, ts, _ in taken for t in ts])
            out.append(one)
    obj = "text_completion" if job.kind == "completion" else "chat.completion"
    return {**job.head(obj), "choices": out, "usage": _usage(job, [c for cs in choices for c in cs])}


def stream_chunks(job: Job, choice: Choice, event: Delta) -> list[dict[str, Any]]:
    """The SSE chunks for one core event of one choice, as OpenAI sends them: (chat only) a first chunk with the
    role, a chunk per text delta (with its tokens' logprobs), a last chunk with the finish reason and no text."""
    chat = job.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(payload: dict[str, Any], finish: str | None, logprobs: Any = None) -> dict[str, Any]:
        c = {"index": choice.index, **payload, "logprobs": logprobs, "finish_reason": finish}
        extra = {"usage": None} if job.include_usage else {}
        return {**job.head(obj), "choices": [c], **extra}

    chunks = []
    prompt_ids = {"prompt_token_ids": list(choice.prompt.ids)} if job.token_ids and not choice.started else {}
    if chat and not choice.started:
        chunks.append(chunk({"delta": {"role": "assistant", "content": ""}, **prompt_ids}, None))
        prompt_ids = {}
    text, tokens, logprobs = choice.take(event)
    if text or (tokens and job.token_ids) or (logprobs is not None and (logprobs.get("content")
                                                                        or logprobs.get("tokens"))):
        payload = {"delta": {"content": text}} if chat else {"text": text}
        ids = {**prompt_ids, "token_ids": tokens} if job.token_ids else {}
        chunks.append(chunk({**payload, **ids}, None, logprobs))
    finish = _finish(event)
    if finish is not None:
        chunks.append(chunk({"delta": {}} if chat else {"text": ""}, finish))
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


async def _close(events: AsyncIterator[Delta]) -> None:
    aclose = getattr(events, "aclose", None)  # an async generator: run its cleanup (cancels the request)
    if aclose is not None:
        await aclose()


async def _firsts(streams: list[AsyncIterator[Delta]]) -> list[Delta]:
    """Every stream's first event; the first error of any, once all have answered."""
    got = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
    for g in got:
        if isinstance(g, BaseException):
            raise g
    return [g for g in got if isinstance(g, Delta)]


async def run(router: Backend, job: Job, request: Request) -> Response:
    """Run the job on the core, a generation per prompt (of n choices). Errors before the first events become an
    HTTP error status; a stream answers as soon as every prompt's first event is there."""
    t0 = time.perf_counter()
    streams = [router.generate(job.request_id(i), p.ids, job.params, job.timeout, job.n)
               for i, p in enumerate(job.prompts)]
    choices = choices_of(job, router.token_texts)
    handed_off = False
    try:
        firsts = await _unless_gone(request, _firsts(streams))
        if job.stream:
            handed_off = True
            return StreamingResponse(_stream(job, choices, firsts, streams, t0), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        events = await _unless_gone(request, asyncio.gather(*(_collect(f, s, job.n)
                                                              for f, s in zip(firsts, streams))))
    except ClientGone:
        log.debug("%s: client disconnected; cancelled", job.id)
        return Response(status_code=499)
    finally:
        if not handed_off:
            for s in streams:
                await _close(s)
    body = whole_response(job, choices, events)
    _log_done(job, [c for cs in choices for c in cs], t0)
    return JSONResponse(body)


async def _collect(first: Delta, events: AsyncIterator[Delta], n: int) -> list[Delta]:
    """A prompt's events until each of its n choices has finished."""
    out = [first]
    finished = int(first.finish_reason is not None)
    while finished < n:
        try:
            out.append(await anext(events))
        except StopAsyncIteration:
            log.warning("the core's stream ended without a finish reason")
            break
        finished += out[-1].finish_reason is not None
    return out


async def _stream(job: Job, choices: list[list[Choice]], firsts: list[Delta], streams: list[AsyncIterator[Delta]],
                  t0: float) -> AsyncIterator[str]:
    """The SSE body; after the last choice's finish, the usage (when asked). When the client goes away Starlette
    cancels the response task; the cancellation runs through the core's generators, and _close ends each."""
    every = [c for cs in choices for c in cs]
    try:
        for i, event in enumerate(firsts):
            for chunk in stream_chunks(job, choices[i][event.index], event):
                yield _sse(chunk)
        async for i, event in merge(streams):
            for chunk in stream_chunks(job, choices[i][event.index], event):
                yield _sse(chunk)
        if all(c.last is not None for c in every):
            _log_done(job, every, t0)
            if job.include_usage:
                obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
                yield _sse({**job.head(obj), "choices": [], "usage": _usage(job, every)})
        else:
            log.warning("%s: the core's stream ended without a finish reason", job.id)
    except asyncio.CancelledError:
        log.debug("%s: client disconnected; cancelled", job.id)
        raise
    except Exception as e:  # noqa: BLE001 - the status line is sent: the error goes in the stream
        yield _sse(api_error(e, job.field_names).body())
    finally:
        for s in streams:
            await _close(s)
    yield "data: [DONE]\n\n"


def _log_done(job: Job, choices: list[Choice], t0: float) -> None:
    """Debug only: the core logs one line per request already (with this id)."""
    log.debug("%s: %s%s choices=%d completion=%d finish=%s %.3fs", job.id, job.kind,
              " stream" if job.stream else "", len(choices), sum(c.completion_tokens for c in choices),
              [_finish(c.last) for c in choices], time.perf_counter() - t0)


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


OPEN_PATHS = ("/health", "/metrics")  # answered without an API key (probes, scrapers)


class ApiKeyAuth:
    """ASGI middleware: every path but OPEN_PATHS needs `Authorization: Bearer <api_key>`, else 401 in OpenAI's
    error shape, before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not bearer_ok(header, self.api_key):
                refusal = ApiError(401, "a valid API key is required: send `Authorization: Bearer <key>`",
                                   code="invalid_api_key").response()
                refusal.headers["WWW-Authenticate"] = "Bearer"
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _param(loc: tuple[int | str, ...]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role"."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or None


def create_app(router: Backend, max_body_bytes: int = MAX_BODY_BYTES, api_key: str | None = None) -> FastAPI:
    """The app; with `api_key`, every path but /health and /metrics needs it as a bearer token."""
    app = FastAPI(title="Baton", summary="OpenAI-compatible API of the Baton router", version="1")
    app.state.router = router
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if api_key:
        app.add_middleware(ApiKeyAuth, api_key=api_key)  # added last: runs first, before the body is read

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
        names = {"max_new_tokens": "max_tokens", "input_ids": "prompt", "prompt_logprobs": "logprobs"}

        def job() -> Job:
            model = router.served.resolve(body.model)
            refuse_unsupported(body)
            prompts = completion_prompts(router, body.prompt)
            max_new = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
            echo_only = max_new == 0 and bool(body.echo)  # score the prompt: one token computed, dropped
            if max_new == 0 and not echo_only:
                raise ApiError.invalid("max_tokens", "0 asks for nothing unless echo is true")
            max_new = max(1, max_new)
            for i, p in enumerate(prompts):
                router.spec.check_request(p.ids, max_new, prompt_field=f"prompt[{i}]" if len(prompts) > 1 else "prompt")
            k = body.logprobs
            params = replace(sampling_params(body, max_new), logprobs=k,
                             prompt_logprobs=k if body.echo and k is not None else None)
            return Job(f"cmpl-{uuid.uuid4().hex}", "completion", model, prompts, params, bool(body.stream),
                       _include_usage(body), names, request_timeout(body), echo=bool(body.echo), echo_only=echo_only,
                       n=choice_count(body), token_ids=bool(body.return_token_ids))

        return await answer(job, request, names)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        max_field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        names = {"max_new_tokens": max_field, "input_ids": "messages", "prompt": "messages",
                 "logprobs": "top_logprobs"}

        def job() -> Job:
            model = router.served.resolve(body.model)
            refuse_unsupported(body)
            prompt_ids = router.encode_chat(chat_messages(body.messages))
            max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            if max_new is None:
                max_new = min(CHAT_DEFAULT_MAX_TOKENS, router.spec.max_context - len(prompt_ids))
                if max_new < 1:
                    raise ApiError.invalid("messages", f"the conversation ({len(prompt_ids)} tokens) fills the "
                                                       f"model's context of {router.spec.max_context} tokens")
            router.spec.check_request(prompt_ids, max_new)
            if body.top_logprobs is not None and not body.logprobs:
                raise ApiError.invalid("top_logprobs", "needs logprobs: true")
            params = replace(sampling_params(body, max_new),
                             logprobs=(body.top_logprobs or 0) if body.logprobs else None)
            return Job(f"chatcmpl-{uuid.uuid4().hex}", "chat", model, [Prompt(prompt_ids)], params,
                       bool(body.stream), _include_usage(body), names, request_timeout(body), n=choice_count(body),
                       token_ids=bool(body.return_token_ids))

        return await answer(job, request, names)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "baton",
                 "max_model_len": router.spec.max_context} for name in router.served.names]
        return {"object": "list", "data": data}

    @app.api_route("/health", methods=["GET", "HEAD"])  # some health checkers send HEAD
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    metrics = getattr(router, "metrics", None)
    if isinstance(metrics, RouterMetrics):

        @app.get("/metrics", include_in_schema=False)
        async def prometheus(request: Request) -> Response:
            body, content_type = metrics.exposition(request.headers.get("accept"))
            return Response(body, headers={"Content-Type": content_type})

    return app


def choice_count(body: OpenAIBody) -> int:
    return check_choices(1 if body.n is None else body.n)


def _include_usage(body: OpenAIBody) -> bool:
    return bool(body.stream and body.stream_options is not None and body.stream_options.include_usage)
