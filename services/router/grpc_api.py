"""The router's public gRPC API: a thin servicer over Router.generate. Errors are raised as exceptions and
turned into status codes by baton.rpc.server.ErrorInterceptor (InvalidRequestError -> INVALID_ARGUMENT naming
the field, Overloaded -> RESOURCE_EXHAUSTED, a `model` the router does not serve (served.py) -> NOT_FOUND, ...).
A call the client cancels, or whose deadline passes, cancels the request on its workers: the handler's task is
cancelled, and Router.generate cleans up on the way out."""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

import grpc

from baton.engine.request import MAX_TIMEOUT_S, SamplingParams
from baton.errors import InvalidRequestError
from baton.rpc.convert import finish_to_proto, logprobs_to_proto, params_from_proto, prompt_logprobs_to_proto
from baton.rpc.server import Service
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.router.core import Delta, Router

SERVICE_NAME = "baton.v1.Router"


class RouterServicer(baton_pb2_grpc.RouterServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    def _parse(self, request: pb.GenerateRequest) -> tuple[str, list[int], SamplingParams]:
        """The request's id (made up when empty), prompt token ids and sampling parameters."""
        self.router.served.resolve(request.model)  # ModelNotFound unless served (empty: the router's model)
        which = request.WhichOneof("prompt")
        if which == "text":
            if not request.text:
                raise InvalidRequestError("text", "must not be empty")
            prompt_ids = self.router.encode_prompt(request.text)
        elif which == "token_ids":
            prompt_ids = list(request.token_ids.ids)
        elif which == "messages":
            prompt_ids = self.router.encode_chat([{"role": m.role, "content": m.content}
                                                  for m in request.messages.messages])
        else:
            raise InvalidRequestError("prompt", "give text or token_ids")
        return request.request_id or uuid.uuid4().hex, prompt_ids, params_from_proto(request.parameters)

    def _logprobs(self, ev: Delta, into: pb.Choice | pb.GenerateStreamResponse,
                  prompt_into: pb.GenerateResponse | pb.GenerateStreamResponse) -> None:
        """The event's logprobs (into its choice or message) and the prompt's (into the response), each token
        with its text."""
        text = self.router.token_texts.text
        into.logprobs.extend(logprobs_to_proto(lp, text) for lp in ev.logprobs)
        if ev.prompt_logprobs is not None:
            prompt_into.prompt_logprobs.extend(prompt_logprobs_to_proto(ev.prompt_logprobs, text))

    def _events(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> tuple[str, list[int], contextlib.aclosing[AsyncGenerator[Delta, None]]]:
        """The request's id, prompt ids and events, closed (so cancelled everywhere) as soon as the handler stops
        reading them. The request may take the shorter of its `timeout` field and the call's deadline."""
        request_id, prompt_ids, params = self._parse(request)
        timeout = request_timeout(request.timeout, context.time_remaining())
        events = self.router.generate(request_id, prompt_ids, params, timeout, max(1, request.n))
        return request_id, prompt_ids, contextlib.aclosing(events)

    def _echo(self, request: pb.GenerateRequest, prompt_ids: list[int]) -> str:
        """The prompt's text, for echo: as given, or as its tokens decode."""
        if request.WhichOneof("prompt") == "text":
            return request.text
        return b"".join(self.router.token_texts.bytes(t) for t in prompt_ids).decode("utf-8", errors="replace")

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        request_id, prompt_ids, generation = self._events(request, context)
        response = pb.GenerateResponse(request_id=request_id)
        choices = [pb.Choice(index=i) for i in range(max(1, request.n))]
        echo = self._echo(request, prompt_ids) if request.echo else ""
        texts: list[list[str]] = [[echo] for _ in choices]
        async with generation as events:
            async for ev in events:
                choice = choices[ev.index]
                choice.token_ids.extend(ev.token_ids)
                texts[ev.index].append(ev.text)
                self._logprobs(ev, choice, response)
                if ev.finish_reason is not None:
                    choice.finish_reason = finish_to_proto(ev.finish_reason)
                    response.usage.prompt_tokens = ev.prompt_tokens
                    response.usage.completion_tokens += ev.completion_tokens
        for choice, parts in zip(choices, texts):
            choice.text = "".join(parts)
        first = choices[0]
        response.text, response.finish_reason = first.text, first.finish_reason
        response.token_ids.extend(first.token_ids)
        response.logprobs.extend(first.logprobs)
        if len(choices) > 1:
            response.choices.extend(choices)
        return response

    async def GenerateStream(  # noqa: N802
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        request_id, prompt_ids, generation = self._events(request, context)
        open_choices, completion = max(1, request.n), 0
        echo = self._echo(request, prompt_ids) if request.echo else ""
        started: set[int] = set()
        async with generation as events:
            async for ev in events:
                text = ev.text if ev.index in started or not echo else echo + ev.text
                started.add(ev.index)
                msg = pb.GenerateStreamResponse(request_id=request_id, text=text, token_ids=ev.token_ids,
                                                index=ev.index)
                self._logprobs(ev, msg, msg)
                if ev.finish_reason is not None:
                    msg.finish_reason = finish_to_proto(ev.finish_reason)
                    open_choices, completion = open_choices - 1, completion + ev.completion_tokens
                    if not open_choices:  # the last choice's end: the usage of them all
                        msg.usage.prompt_tokens = ev.prompt_tokens
                        msg.usage.completion_tokens = completion
                yield msg


def request_timeout(timeout: float, deadline_s: float | None) -> float | None:
    """Seconds a request may take: the shorter of its `timeout` field (0: none) and the call's deadline."""
    if not (math.isfinite(timeout) and 0 <= timeout <= MAX_TIMEOUT_S):
        raise InvalidRequestError("timeout", f"must be a number of seconds in [0, {MAX_TIMEOUT_S:g}] (0: none)")
    limits = [t for t in (timeout or None, deadline_s) if t is not None]
    return min(limits) if limits else None


def router_service(router: Router) -> Service:
    return Service(RouterServicer(router), baton_pb2_grpc.add_RouterServicer_to_server, SERVICE_NAME)
