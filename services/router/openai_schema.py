"""The OpenAI API's shapes as Baton serves them: request bodies, errors, and their mapping to Baton's types.

See services/router/http_api.py for the compatibility choices; this file holds the parsing half of them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from baton.engine.grammar import ResponseFormat
from baton.engine.request import MAX_TIMEOUT_S, SamplingParams
from baton.engine.spec import ModelSpec
from baton.errors import InvalidRequestError, Reason, ServiceError, reason_of
from services.router.served import ServedModels
from services.router.text import Delta, TokenTexts

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Chat without max_tokens: this many, or the rest of the context if less. Not the whole context, as OpenAI
# does: a decode worker reserves KV for prompt + max_tokens, so a large default would cut its concurrency.
CHAT_DEFAULT_MAX_TOKENS = 1024


# ---- what the API needs from the router core -------------------------------------------------------------
class Backend(Protocol):
    """The router core (services.router.core.Router) as this API uses it."""

    served: ServedModels  # the names clients may ask for, and the check of a request's `model`
    spec: ModelSpec  # the model's limits

    @property
    def token_texts(self) -> TokenTexts: ...  # each token's text and bytes (logprobs, echo)

    def encode_prompt(self, text: str) -> list[int]: ...
    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...
    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, timeout: float | None = None,
        n: int = 1,
    ) -> AsyncIterator[Delta]: ...


# ---- errors ----------------------------------------------------------------------------------------------
_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable_error",
                504: "timeout_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s
        self.kind = kind  # the error's `type`; None: the status's (_ERROR_TYPES)

    @classmethod
    def invalid(cls, param: str | None, message: str) -> ApiError:
        return cls(400, f"{param}: {message}" if param else message, param)

    def body(self) -> dict[str, Any]:
        kind = self.kind or _ERROR_TYPES.get(self.status,
                                             "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s)))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# HTTP status of each reason a Baton error can carry (baton/errors.py).
HTTP_STATUS = {
    Reason.INVALID_REQUEST: 400, Reason.MALFORMED_MESSAGE: 400, Reason.INVALID_KV: 400, Reason.OVERLOADED: 429,
    Reason.UNAVAILABLE: 503, Reason.NOT_FOUND: 404, Reason.MODEL_NOT_FOUND: 404, Reason.CANCELLED: 499,
    Reason.DEADLINE_EXCEEDED: 504, Reason.KV_LEASE_EXPIRED: 504, Reason.KV_PUSH_FAILED: 503,
    Reason.UNKNOWN_PEER: 503, Reason.PREFIX_EVICTED: 503, Reason.UNAUTHENTICATED: 401, Reason.INTERNAL: 500,
}


def api_error(exc: BaseException, params: dict[str, str]) -> ApiError:
    """The API error an exception from parsing or from the core stands for, by its reason and field alone;
    `params` renames engine fields to this endpoint's (max_new_tokens -> max_tokens)."""
    if isinstance(exc, ApiError):
        return exc
    reason = reason_of(exc)
    if isinstance(exc, InvalidRequestError):
        if exc.field is None:
            return ApiError(400, exc.detail)
        param = params.get(exc.field, exc.field)
        return ApiError(400, f"{param}: {exc.detail}", param)
    if reason is Reason.MODEL_NOT_FOUND:  # as OpenAI answers it (and the openai client raises NotFoundError)
        return ApiError(404, str(exc), "model", code=reason.value, kind="invalid_request_error")
    if reason is Reason.OVERLOADED:
        return ApiError(429, str(exc), code="overloaded", retry_after_s=getattr(exc, "retry_after_s", None) or 1.0)
    if reason is Reason.INTERNAL and not isinstance(exc, ServiceError):
        log.error("internal error", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}")
    return ApiError(HTTP_STATUS[reason], str(exc) or reason.value)


# ---- request bodies --------------------------------------------------------------------------------------
# Strict: "0.5" is not a number and true is not 1. Fields outside the model are kept (extra="allow") so that
# refuse_unsupported can name them: OpenAI's own bookkeeping fields (IGNORED) are accepted, any other is refused.
class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool | None = None


class OpenAIBody(BaseModel):
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
    logit_bias: dict[str, Any] | None = None  # token id (a string of digits) -> bias in [-100, 100]
    min_tokens: int | None = None  # extension, as in vLLM
    response_format: Any = None  # {"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}
    timeout: float | None = None  # extension: seconds the whole request may take (then 504, or an error event)
    return_token_ids: bool | None = None  # extension, as in vLLM: each choice (stream chunk) carries its token ids


class CompletionRequest(OpenAIBody):
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


class ChatCompletionRequest(OpenAIBody):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


# Fields Baton cannot honour, with the values that ask for nothing (and so are accepted).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "suffix": (None, ""), "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
}


# OpenAI request fields that ask nothing of the generation: accepted and ignored.
IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                     "safety_identifier"})


def _shown(value: Any, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short (an error never echoes a whole input back)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def refuse_unsupported(body: OpenAIBody) -> None:
    unknown = sorted(set(body.model_extra or {}) - IGNORED)
    if unknown:
        raise ApiError.invalid(unknown[0][:60], f"unknown field {_shown(unknown[0])}")
    for name, ok in NEUTRAL.items():
        if name in type(body).model_fields and getattr(body, name) not in ok:
            raise ApiError.invalid(name, f"{_shown(getattr(body, name))} is not supported by Baton")


def sampling_params(body: OpenAIBody, max_new_tokens: int) -> SamplingParams:
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
        presence_penalty=0.0 if body.presence_penalty is None else body.presence_penalty,
        frequency_penalty=0.0 if body.frequency_penalty is None else body.frequency_penalty,
        logit_bias=logit_bias(body.logit_bias),
        min_tokens=body.min_tokens or 0,
        response_format=ResponseFormat.from_openai(body.response_format),
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


def logit_bias(raw: dict[str, Any] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as the engine's pairs (their range and the ids' vocabulary are checked there)."""
    out = []
    for key, bias in (raw or {}).items():
        if not key.isdigit() or not key.isascii():
            raise ApiError.invalid("logit_bias", f"keys must be token ids, got {_shown(key)}")
        if not isinstance(bias, (int, float)) or isinstance(bias, bool):
            raise ApiError.invalid("logit_bias", f"the bias of token {key} must be a number")
        out.append((int(key), float(bias)))
    return tuple(sorted(out))


def request_timeout(body: OpenAIBody) -> float | None:
    t = body.timeout
    if t is not None and not (math.isfinite(t) and 0 < t <= MAX_TIMEOUT_S):
        raise ApiError.invalid("timeout", f"must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    return t


@dataclass
class Prompt:
    """One prompt of a request: its token ids, and its text when it came as text (what echo returns)."""

    ids: list[int]
    text: str | None = None


MAX_PROMPTS = 64  # prompts one completions request may hold


def completion_prompts(router: Backend, prompt: Any) -> list[Prompt]:
    """A completions `prompt`: a string, a list of token ids, or a list of either (one choice per prompt)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise ApiError.invalid("prompt", f"at most {MAX_PROMPTS} prompts per request")
        return [_one_prompt(router, p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [_one_prompt(router, prompt, "prompt")]


def _one_prompt(router: Backend, prompt: Any, name: str) -> Prompt:
    if isinstance(prompt, str):
        if not prompt:
            raise ApiError.invalid(name, "must not be empty")
        return Prompt(router.encode_prompt(prompt), prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if min(prompt) < 0:
            raise ApiError.invalid(name, "token ids must be >= 0")
        return Prompt(list(prompt))
    raise ApiError.invalid(name, "must be a non-empty string or a non-empty list of token ids")


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as Router.encode_chat takes them: a role (checked there) and a text content."""
    if not messages:
        raise ApiError.invalid("messages", "must not be empty")
    out = []
    for i, m in enumerate(messages):
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
        out.append({"role": m.role, "content": content})
    return out
