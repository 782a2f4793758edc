"""The internal token: the secret every call between Baton's services carries, so that a worker's port serves
its cluster's router and prefill workers and nobody else.

Invariant: a worker started from the command line answers no RPC but gRPC health (probes) unless the call
carries `authorization: Bearer <internal token>`, and every channel a service opens to another (baton/rpc/
server.py: channel(), ChannelCache) sends it. Mutual TLS, where configured, comes on top; the token is still
checked.

Where the token comes from, first match wins:
1. --internal-token (BATON_INTERNAL_TOKEN): `baton serve` generates one per run and hands it to its services in
   the environment (never on a command line, which other users can read); Kubernetes mounts a Secret.
2. --internal-token-file (BATON_INTERNAL_TOKEN_FILE), by default `internal-token` in Baton's cache directory
   (~/.cache/baton, or BATON_CACHE_DIR): read it, or create it with a fresh random token (mode 0600) when it does
   not exist. Processes of one user on one machine, and containers sharing the compose stack's model volume,
   so agree on a token with nothing configured.

This module imports grpc and nothing of Baton's but the cache directory's location (so `baton health`, the
container HEALTHCHECK, stays free of torch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import grpc

from baton.flags import cache_dir

log = logging.getLogger(__name__)

TOKEN_FILE_NAME = "internal-token"
MIN_TOKEN_CHARS = 16


def default_token_file() -> Path:
    """Where processes that were given no token keep the one they share: in Baton's cache directory."""
    return cache_dir() / TOKEN_FILE_NAME


def new_token() -> str:
    """A fresh random token (256 bits)."""
    return secrets.token_urlsafe(32)


def _checked(token: str, source: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise ValueError(f"{source}: the internal token must be at least {MIN_TOKEN_CHARS} printable characters "
                         "without spaces")
    return token


def _read_or_create(path: Path) -> str:
    """The token in `path`; a new one written there first when the file does not exist. Safe when several
    processes start at once: the file appears whole (written aside, then linked into place) and the first one
    linked wins. ValueError when it can be neither read nor made."""
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            aside = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
            fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(new_token() + "\n")
                with contextlib.suppress(FileExistsError):  # another process was first: take its token
                    os.link(aside, path)
            finally:
                aside.unlink(missing_ok=True)
        if path.stat().st_mode & 0o077:
            log.warning("%s can be read by other users than its owner (chmod 600 it): they can call the workers",
                        path)
        return path.read_text()
    except OSError as e:
        raise ValueError(f"--internal-token-file: cannot read or create {path}: {e.strerror}") from None


def resolve_internal_token(token: str | None, path: str | None) -> str:
    """The internal token from the flags' values (see the module docstring); ValueError naming the problem."""
    if token:
        return _checked(token, "--internal-token")
    file = Path(path) if path else default_token_file()
    return _checked(_read_or_create(file), f"--internal-token-file {file}")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token`."""
    return (("authorization", f"Bearer {token}"),)


class _WithToken:
    def __init__(self, token: str) -> None:
        self.metadata = bearer(token)

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self.metadata)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


class _UnaryUnary(_WithToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails,
                                    request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _UnaryStream(_WithToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails,
                                     request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _StreamUnary(_WithToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails,
                                     request_iterator: Any) -> Any:
        return await continuation(self._with_token(details), request_iterator)


class _StreamStream(_WithToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Callable[..., Any], details: grpc.aio.ClientCallDetails,
                                      request_iterator: Any) -> Any:
        return await continuation(self._with_token(details), request_iterator)


class _SyncDetails(NamedTuple):  # grpc.ClientCallDetails, with other metadata
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any


class _SyncWithToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                     grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.metadata = bearer(token)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_SyncDetails(details.method, details.timeout, [*(details.metadata or ()), *self.metadata],
                                         details.credentials, details.wait_for_ready, details.compression), request)

    intercept_unary_stream = intercept_unary_unary
    intercept_stream_unary = intercept_unary_unary
    intercept_stream_stream = intercept_unary_unary


def blocking_channel(address: str, token: str) -> grpc.Channel:
    """A plaintext blocking channel to a worker whose calls carry `token` (for tools and tests; the services
    themselves use asyncio channels made by baton.rpc.server.channel)."""
    return grpc.intercept_channel(grpc.insecure_channel(address), _SyncWithToken(token))


def token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that add the internal token to every call of an asyncio channel: one per kind of call (an
    asyncio channel files each interceptor under the first kind it is an instance of)."""
    return [kind(token) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]
