"""The gRPC frame every Baton service shares: an asyncio server with the standard health service, server
reflection, message limits sized for KV chunks, and one interceptor that turns exceptions into gRPC status
(baton/rpc/status.py; and, on the router's public port, checks the API key). Every server is made by
create_server and every client channel between services by channel(), both with mutual TLS when given a
TlsConfig."""

from __future__ import annotations

import hmac
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from baton.errors import MalformedMessage, Unauthenticated
from baton.rpc.internal_token import token_interceptors
from baton.rpc.status import abort_with

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # A worker restarted under the same address is dialled again within 2 s (gRPC's default backoff grows to
    # 2 minutes, during which every call to it fails at once).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


OPEN_METHODS = ("/grpc.health.v1.Health/",)  # answered without an API key (probes)


def bearer_ok(header: str | None, api_key: str) -> bool:
    """Whether an `authorization` value is "Bearer <api_key>" (compared in constant time)."""
    scheme, _, token = (header or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


@dataclass
class _Malformed:
    """Stands for a request message that did not parse; the handler wrapper turns it into INVALID_ARGUMENT."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as e:  # noqa: BLE001 - any parse failure is the caller's bad input
            return _Malformed(f"{type(e).__name__}: {e}")

    return parse


def _parsed(request: Any, method: str) -> Any:
    if isinstance(request, _Malformed):
        raise MalformedMessage(f"the request is not a valid message for {method} ({request.error})")
    return request


async def _parsed_stream(requests: AsyncIterator[Any], method: str) -> AsyncIterator[Any]:
    async for request in requests:
        yield _parsed(request, method)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns exceptions raised by handlers into gRPC status codes, in one place; request bytes that do not parse
    become INVALID_ARGUMENT. With `api_key` (the router's public port) or `internal_token` (a worker's port,
    baton/rpc/internal_token.py), every method but health needs `authorization: Bearer <it>` metadata (else
    UNAUTHENTICATED)."""

    def __init__(self, api_key: str | None = None, internal_token: str | None = None) -> None:
        if api_key and internal_token:
            raise ValueError("a port takes an API key (public) or the internal token (workers), not both")
        self.secret = api_key or internal_token or None
        self.what = "a valid API key" if api_key else "the cluster's internal token"

    def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        if self.secret is None or method.startswith(OPEN_METHODS):
            return
        metadata = dict(context.invocation_metadata() or ())
        if not bearer_ok(metadata.get("authorization"), self.secret):
            raise Unauthenticated(f"{self.what} is required: send `authorization: Bearer <it>` metadata")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method

        def wrap_unary(fn: Callable[..., Awaitable[Any]], streaming_request: bool) -> Callable[..., Awaitable[Any]]:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    self._admit(method, context)
                    request = _parsed_stream(request, method) if streaming_request else _parsed(request, method)
                    return await fn(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:  # noqa: BLE001 - every error becomes a status
                    await abort_with(context, e, method)

            return call

        def wrap_stream(fn: Callable[..., Any], streaming_request: bool) -> Callable[..., Any]:
            async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    self._admit(method, context)
                    request = _parsed_stream(request, method) if streaming_request else _parsed(request, method)
                    async for item in fn(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as e:  # noqa: BLE001
                    await abort_with(context, e, method)

            return call

        parse, dump = _tolerant(handler.request_deserializer), handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(wrap_unary(handler.unary_unary, False), parse, dump)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(wrap_unary(handler.stream_unary, True), parse, dump)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(wrap_stream(handler.unary_stream, False), parse, dump)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(wrap_stream(handler.stream_stream, True), parse, dump)
        return handler


LIVENESS = "liveness"  # the health service name that liveness probes ask for


@dataclass
class Service:
    """A servicer, its generated `add_XServicer_to_server` function and its full name (for health/reflection)."""

    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]
    name: str


@dataclass(frozen=True)
class TlsConfig:
    """Mutual TLS between Baton's services: this service's certificate chain and private key (PEM), and the CA
    certificate (PEM) that signed every service's certificate. A server requires a client certificate signed by
    the CA; a client checks the server's certificate against the CA (and the dialled host name) and presents its
    own."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def from_files(cls, cert: str | None, key: str | None, ca: str | None) -> TlsConfig | None:
        """None when no file is given (plaintext); ValueError when only some are, or one cannot be read."""
        files = {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}
        if not any(files.values()):
            return None
        missing = [flag for flag, path in files.items() if not path]
        if missing:
            raise ValueError(f"--tls-cert, --tls-key and --tls-ca go together: {', '.join(missing)} missing")
        data = {}
        for flag, path in files.items():
            try:
                data[flag] = Path(str(path)).read_bytes()
            except OSError as e:
                raise ValueError(f"{flag}: cannot read {path}: {e.strerror}") from None
        return cls(data["--tls-cert"], data["--tls-key"], data["--tls-ca"])

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def create_server(
    services: Sequence[Service],
    address: str,
    *,
    tls: TlsConfig | None = None,
    api_key: str | None = None,
    internal_token: str | None = None,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server listening on `address` (host:port) with health, reflection and the error interceptor: with `tls`,
    mutual TLS (clients must present a certificate signed by its CA); with `api_key` or `internal_token`, calls
    other than health need it as a bearer token; messages over `max_message_bytes` are refused
    (RESOURCE_EXHAUSTED).
    Health reports SERVING for every service; set NOT_SERVING on the returned health servicer to drain."""
    options = [(k, max_message_bytes if k == "grpc.max_receive_message_length" else v) for k, v in CHANNEL_OPTIONS]
    options.append(("grpc.so_reuseport", 0))  # a port someone else holds fails here, never serves both
    server = grpc.aio.server(interceptors=[ErrorInterceptor(api_key, internal_token)], options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for s in services:
        s.add_to_server(s.servicer, server)
    names = [s.name for s in services] + [health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    if tls is not None:
        server.add_secure_port(address, tls.server_credentials())
    else:
        server.add_insecure_port(address)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, services: Sequence[Service], serving: bool) -> None:
    """Readiness: "" and each service report `serving`. Liveness: the "liveness" service reports SERVING for as
    long as the process answers at all (a draining worker or a router waiting for workers is alive, not ready)."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *(s.name for s in services)]:
        await health_servicer.set(name, status)
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)


def channel(address: str, tls: TlsConfig | None = None, internal_token: str | None = None) -> grpc.aio.Channel:
    """A client channel to another Baton service: every channel between services is made here, with mutual TLS
    when `tls` is given (the same TlsConfig the calling service serves with), and every call carrying the
    internal token when given (baton/rpc/internal_token.py)."""
    interceptors = token_interceptors(internal_token) if internal_token else None
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.channel_credentials(), options=CHANNEL_OPTIONS,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)


def advertised_address(host: str, port: int, advertise: str | None) -> str:
    """The address other services should dial to reach this worker: --advertise when given; else the listen
    host; for a wildcard listen host, this machine's address as its own hostname resolves (a container's or a
    pod's IP), which is what routers and prefill workers on other machines can reach."""
    if advertise:
        return advertise
    if host not in ("", "0.0.0.0", "::", "[::]"):
        return f"{host}:{port}"
    name = socket.gethostname()
    try:
        return f"{socket.gethostbyname(name)}:{port}"
    except OSError:
        return f"{name}:{port}"


class ChannelCache:
    """One channel per address, made on first use by channel() and kept until close(): how a router reaches its
    workers and a prefill worker its decode workers."""

    def __init__(self, tls: TlsConfig | None = None, internal_token: str | None = None) -> None:
        self.tls, self.internal_token = tls, internal_token
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = channel(address, self.tls, self.internal_token)
        return self._channels[address]

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
