"""Baton's errors (baton/errors.py) on gRPC, both ways: the one place where a Reason becomes a status code and
trailing metadata, and where a failed call becomes a Baton error again.

A failing handler's call ends with the status code of its reason, its message as the details, and trailing
metadata `baton-reason` (the Reason's value), `baton-field` (an invalid request's field), `baton-upstream` (the
decode side's reason of a failed KV push) and `retry-after-s` (the retry hint). `error_from_rpc` reads them
back; a call that failed without them (a connection refused, a deadline gRPC itself enforced) gets the reason
its status code stands for. Decisions downstream read `reason` and `field` only, never the details text.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from baton.errors import InvalidRequestError, Reason, ServiceError, error_of, reason_of

log = logging.getLogger(__name__)

REASON_KEY = "baton-reason"
FIELD_KEY = "baton-field"
UPSTREAM_KEY = "baton-upstream"
RETRY_AFTER_KEY = "retry-after-s"

CODES: dict[Reason, grpc.StatusCode] = {
    Reason.INVALID_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.MALFORMED_MESSAGE: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.INVALID_KV: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.MODEL_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.CANCELLED: grpc.StatusCode.CANCELLED,
    Reason.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.KV_LEASE_EXPIRED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Reason.UNKNOWN_PEER: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.PREFIX_EVICTED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.INTERNAL: grpc.StatusCode.INTERNAL,
}
# A call that failed without Baton's metadata: what its status code means.
_REASON_OF_CODE: dict[grpc.StatusCode, Reason] = {
    grpc.StatusCode.INVALID_ARGUMENT: Reason.INVALID_REQUEST,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Reason.OVERLOADED,
    grpc.StatusCode.UNAVAILABLE: Reason.UNAVAILABLE,
    grpc.StatusCode.NOT_FOUND: Reason.NOT_FOUND,
    grpc.StatusCode.CANCELLED: Reason.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED: Reason.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNAUTHENTICATED: Reason.UNAUTHENTICATED,
}


def code_of(exc: BaseException) -> grpc.StatusCode:
    """The status code an exception ends a call with (a failed KV push passes the decode side's on)."""
    reason = reason_of(exc)
    if reason is Reason.KV_PUSH_FAILED:
        return CODES[getattr(exc, "upstream", Reason.UNAVAILABLE)]
    return CODES[reason]


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status code, details and trailing metadata a call that failed with `exc` ends with."""
    reason = reason_of(exc)
    message = str(exc) or reason.value
    if reason is Reason.INTERNAL and not isinstance(exc, ServiceError):
        message = f"internal error: {type(exc).__name__}: {exc}"
    metadata = [(REASON_KEY, reason.value)]
    if isinstance(exc, InvalidRequestError) and exc.field:
        metadata.append((FIELD_KEY, exc.field))
    upstream = getattr(exc, "upstream", None)
    if isinstance(upstream, Reason):
        metadata.append((UPSTREAM_KEY, upstream.value))
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None:
        metadata.append((RETRY_AFTER_KEY, f"{retry:g}"))
    return code_of(exc), message, tuple(metadata)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """End the call being handled with `exc` (a bug, reason INTERNAL, is logged with its traceback)."""
    code, message, metadata = status_of(exc)
    if reason_of(exc) is Reason.INTERNAL:
        log.exception("%s failed", method)
    context.set_trailing_metadata(metadata)
    await context.abort(code, message)


def _reason(value: str | None) -> Reason | None:
    try:
        return Reason(value) if value else None
    except ValueError:  # a newer peer's reason: fall back on the status code
        return None


def trailing(call: Any) -> dict[str, str]:
    """A finished call's trailing metadata as a dict (empty when it has none)."""
    try:
        items = call.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - some failed calls cannot say
        return {}
    return {str(k): v if isinstance(v, str) else v.decode("latin-1") for k, v in items}


def error_from_rpc(e: grpc.RpcError) -> ServiceError:
    """The Baton error a failed call stands for: the reason, field and retry hint its handler sent, or what its
    status code means."""
    call: Any = e
    code: grpc.StatusCode = call.code()
    details: str = call.details() or code.name
    meta = trailing(call)
    reason = _reason(meta.get(REASON_KEY)) or _REASON_OF_CODE.get(code, Reason.INTERNAL)
    field = meta.get(FIELD_KEY) or None
    if field is not None:
        details = details.removeprefix(f"{field}: ")  # the field travels apart; only the text stays for people
    retry: float | None = None
    try:
        retry = float(meta[RETRY_AFTER_KEY]) if RETRY_AFTER_KEY in meta else None
    except ValueError:
        retry = None
    return error_of(reason, details, field, retry, _reason(meta.get(UPSTREAM_KEY)))
