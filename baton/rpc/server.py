"""The gRPC frame every Baton service shares: an asyncio server with the standard health service, server
reflection, message limits sized for KV chunks, and one interceptor that turns exceptions into gRPC status."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.engine.errors import PayloadError
from baton.engine.request import InvalidRequestError

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


class ServiceError(Exception):
    """An error with a chosen gRPC status code (and HTTP status, for the router's HTTP API)."""

    code = grpc.StatusCode.INTERNAL
    http_status = 500

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE
    http_status = 503


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND
    http_status = 404


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status an exception stands for."""
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, (InvalidRequestError, PayloadError, ValueError)):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "deadline exceeded"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


RETRY_AFTER_KEY = "retry-after-s"  # trailing metadata carrying ServiceError.retry_after_s


async def abort_with(context: grpc.aio.ServicerContext, exc: Exception, method: str) -> None:
    code, msg = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, f"{retry:g}"),))
    await context.abort(code, msg)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by handlers into gRPC status codes, in one place."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method

        def wrap_unary(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await fn(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:  # noqa: BLE001 - every error becomes a status
                    await abort_with(context, e, method)

            return call

        def wrap_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for item in fn(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as e:  # noqa: BLE001
                    await abort_with(context, e, method)

            return call

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return handler


@dataclass
class Service:
    """A servicer, its generated `add_XServicer_to_server` function and its full name (for health/reflection)."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    name: str


def create_server(services: Sequence[Service], address: str) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server listening on `address` (host:port) with health, reflection and the error interceptor.
    Health reports SERVING for every service; set NOT_SERVING on the returned health servicer to drain."""
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=CHANNEL_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for s in services:
        s.add_to_server(s.servicer, server)
    names = [s.name for s in services] + [health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    server.add_insecure_port(address)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, services: Sequence[Service], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *(s.name for s in services)]:
        await health_servicer.set(name, status)


def channel(address: str) -> grpc.aio.Channel:
    """A client channel to another Baton service."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
