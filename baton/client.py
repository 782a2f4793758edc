"""A Python client for Baton's gRPC API (the router's baton.v1.Router service).

    from baton.client import BatonClient

    with BatonClient("127.0.0.1:50051") as client:
        print(client.generate("The capital of France is", max_new_tokens=8).text)
        for chunk in client.stream("Once upon a time", max_new_tokens=32, temperature=0.7, seed=1):
            print(chunk.text, end="", flush=True)

AsyncBatonClient has the same methods, as a coroutine (generate) and an async iterator (stream). The prompt is
a string (tokenized by the router), a list of token ids, or a conversation: a list of {"role", "content"} dicts
(written by the model's chat template). Keyword arguments are the fields of baton.engine.request.SamplingParams
(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop, stop_token_ids, ignore_eos,
presence_penalty, frequency_penalty, logit_bias as {token id: bias}, min_tokens, logprobs, prompt_logprobs, and
response_format as OpenAI writes it, e.g. {"type": "json_schema", "json_schema": {"name": "x", "schema": {...}}}),
checked before anything is sent; `n` asks for several choices of one prefill (Completion.choices; each Chunk names
its choice by `index`) and `echo` begins each choice's text with the prompt's; `model` names one of the router's
served model names (empty: its model; another name fails with NOT_FOUND). Every failure, local validation included,
is raised as BatonError(code, message) with the gRPC status code. Leaving a stream early cancels the request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc

from baton.engine.grammar import ResponseFormat
from baton.engine.request import SamplingParams
from baton.engine.sampler import check_choices
from baton.errors import InvalidRequestError, Reason
from baton.rpc.convert import finish_from_proto, params_to_proto
from baton.rpc.status import error_from_rpc
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"
_OPTIONS = [("grpc.max_receive_message_length", 16 << 20), ("grpc.max_send_message_length", 16 << 20)]

Prompt = str | Sequence[int] | Sequence[dict[str, str]]


class BatonError(Exception):
    """A request that failed: `code` is the gRPC status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE ...),
    `reason` Baton's own name for what happened (baton.errors.Reason: "invalid_request", "overloaded", ...),
    `field` the request field at fault of an invalid request, `retry_after_s` when a retry may succeed; decide on
    these, not on the message."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: Reason | None = None, field: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message
        self.reason, self.field, self.retry_after_s = reason, field, retry_after_s

    @classmethod
    def of(cls, e: grpc.RpcError) -> BatonError:
        call: Any = e  # a failed call: has code() and details()
        err = error_from_rpc(e)
        return cls(call.code(), call.details() or call.code().name, err.reason,
                   err.field if isinstance(err, InvalidRequestError) else None, err.retry_after_s)


@dataclass(frozen=True)
class Logprob:
    """A token, its text and its log-probability under the model's raw distribution."""

    token: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """One position: the token there and the most likely tokens at it, most likely first."""

    chosen: Logprob
    top: list[Logprob]


def _logprobs(ms: Sequence[pb.TokenLogprobs]) -> list[TokenLogprobs]:
    def one(m: pb.Logprob) -> Logprob:
        return Logprob(m.token, m.text, m.logprob)

    return [TokenLogprobs(one(m.chosen), [one(t) for t in m.top]) for m in ms]


@dataclass(frozen=True)
class Completion:
    """A whole generation."""

    text: str  # cut before the stop string, if one ended it
    token_ids: list[int]
    finish_reason: str  # "stop", "length" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    request_id: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # with logprobs=k: one per token
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # with prompt_logprobs=k: all but the first
    choices: list[Choice] = field(default_factory=list)  # with n > 1: every choice (the fields above: choice 0's)


@dataclass(frozen=True)
class Choice:
    """One of the n choices of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] = field(default_factory=list)


@dataclass(frozen=True)
class Chunk:
    """New tokens of a stream; the last chunk has the finish reason and the token counts."""

    text: str  # may be empty while a multi-byte character or a possible stop string is incomplete
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # with logprobs=k: one per token
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # on the first chunk, with prompt_logprobs
    index: int = 0  # the choice these tokens belong to (n > 1); the usage comes on the last chunk of all


def build_request(prompt: Prompt, request_id: str = "", model: str = "", n: int = 1, echo: bool = False,
                  **sampling: Any) -> pb.GenerateRequest:
    """The GenerateRequest for a prompt; raises BatonError(INVALID_ARGUMENT) naming a bad field, TypeError for
    a keyword that is not a sampling parameter."""
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = [sampling["stop"]]
    for key in ("stop", "stop_token_ids"):
        if isinstance(sampling.get(key), (list, tuple)):
            sampling[key] = tuple(sampling[key])
    try:
        if isinstance(sampling.get("logit_bias"), dict):
            sampling["logit_bias"] = tuple(sorted(sampling["logit_bias"].items()))
        if not isinstance(sampling.get("response_format"), (ResponseFormat, type(None))):
            sampling["response_format"] = ResponseFormat.from_openai(sampling["response_format"])
        params = SamplingParams(**sampling)
        check_choices(n)
    except InvalidRequestError as e:
        raise BatonError(grpc.StatusCode.INVALID_ARGUMENT, str(e), e.reason, e.field) from None
    request = pb.GenerateRequest(request_id=request_id, parameters=params_to_proto(params), model=model, n=n,
                                 echo=echo)
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        if not all(isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt):  # type: ignore[union-attr]
            raise BatonError(grpc.StatusCode.INVALID_ARGUMENT, "messages: each needs a string role and content")
        request.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"])  # type: ignore[index]
                                         for m in prompt)
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) and 0 <= t < 2**32 for t in prompt):
        request.token_ids.ids.extend([int(t) for t in prompt])  # type: ignore[arg-type]
    else:
        raise BatonError(grpc.StatusCode.INVALID_ARGUMENT,
                         "prompt: must be a string, a list of token ids >= 0 or a list of chat messages")
    return request


def _auth(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def _reason(value: int) -> str | None:
    reason = finish_from_proto(value)
    return None if reason is None else reason.value


def _completion(m: pb.GenerateResponse) -> Completion:
    choices = [Choice(c.index, c.text, list(c.token_ids), _reason(c.finish_reason) or "", _logprobs(c.logprobs))
               for c in m.choices]
    return Completion(m.text, list(m.token_ids), _reason(m.finish_reason) or "", m.usage.prompt_tokens,
                      m.usage.completion_tokens, m.request_id, _logprobs(m.logprobs), _logprobs(m.prompt_logprobs),
                      choices)


def _chunk(m: pb.GenerateStreamResponse) -> Chunk:
    return Chunk(m.text, list(m.token_ids), _reason(m.finish_reason), m.usage.prompt_tokens,
                 m.usage.completion_tokens, _logprobs(m.logprobs), _logprobs(m.prompt_logprobs), m.index)


class BatonClient:
    """A blocking client. `timeout`: seconds a request may take (None: no limit); each call may override it.
    `api_key`: sent as `authorization: Bearer <key>` to a router that requires one (--api-key)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = None,
                 api_key: str | None = None) -> None:
        self.address, self.timeout = address, timeout
        self._metadata = _auth(api_key)
        self._channel = grpc.insecure_channel(address, options=_OPTIONS)
        self._stub = baton_pb2_grpc.RouterStub(self._channel)

    def generate(self, prompt: Prompt, *, request_id: str = "", model: str = "",
                 timeout: float | None = None, **sampling: Any) -> Completion:
        request = build_request(prompt, request_id, model, **sampling)
        try:
            return _completion(self._stub.Generate(request, timeout=self._timeout(timeout),
                                                   metadata=self._metadata))
        except grpc.RpcError as e:
            raise BatonError.of(e) from None

    def stream(self, prompt: Prompt, *, request_id: str = "", model: str = "", timeout: float | None = None,
               **sampling: Any) -> Generator[Chunk, None, None]:
        """Chunks as tokens are sampled. The arguments are checked at once; stopping the iteration early (break,
        close) cancels the request."""
        request = build_request(prompt, request_id, model, **sampling)
        return self._chunks(self._stub.GenerateStream(request, timeout=self._timeout(timeout),
                                                      metadata=self._metadata))

    @staticmethod
    def _chunks(call: Any) -> Generator[Chunk, None, None]:
        try:
            for message in call:
                yield _chunk(message)
        except grpc.RpcError as e:
            raise BatonError.of(e) from None
        finally:
            call.cancel()  # nothing when the stream is over; otherwise the router cancels the request

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> BatonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncBatonClient:
    """The asyncio client: `await client.generate(...)`, `async for chunk in client.stream(...)`."""

    def __init__(self, address: str = DEFAULT_ADDRESS, timeout: float | None = None,
                 api_key: str | None = None) -> None:
        self.address, self.timeout = address, timeout
        self._metadata = _auth(api_key)
        self._channel: grpc.aio.Channel | None = None  # made in the running event loop, on first use

    def _stub(self) -> baton_pb2_grpc.RouterStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=_OPTIONS)
        return baton_pb2_grpc.RouterStub(self._channel)

    async def generate(self, prompt: Prompt, *, request_id: str = "", model: str = "",
                       timeout: float | None = None, **sampling: Any) -> Completion:
        request = build_request(prompt, request_id, model, **sampling)
        try:
            return _completion(await self._stub().Generate(request, timeout=self._timeout(timeout),
                                                           metadata=self._metadata))
        except grpc.RpcError as e:
            raise BatonError.of(e) from None

    def stream(self, prompt: Prompt, *, request_id: str = "", model: str = "", timeout: float | None = None,
               **sampling: Any) -> AsyncGenerator[Chunk, None]:
        """Chunks as tokens are sampled. The arguments are checked at once; leaving the iteration early (break,
        aclose, cancellation) cancels the request."""
        request = build_request(prompt, request_id, model, **sampling)
        return self._chunks(self._stub().GenerateStream(request, timeout=self._timeout(timeout),
                                                        metadata=self._metadata))

    @staticmethod
    async def _chunks(call: Any) -> AsyncGenerator[Chunk, None]:
        try:
            async for message in call:
                yield _chunk(message)
        except grpc.RpcError as e:
            raise BatonError.of(e) from None
        finally:
            call.cancel()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> AsyncBatonClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
