"""Errors that cross process boundaries, free of any transport: the one home of every error a Baton service
raises for another process (or a client) to act on.

Every error carries a machine-readable `Reason`, and an `InvalidRequestError` the `field` at fault. A process
decides what to do about another's error from those alone, never from its message, which is for people. The
edges map them to a transport and back: `baton/rpc/status.py` to gRPC status codes plus trailing metadata
(reason, field, retry hint) and back into these classes; `services/router/openai_schema.py` to HTTP statuses.
This module imports nothing of Baton's, torch or grpc, so every layer can raise these.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class Reason(enum.Enum):
    """Why a call failed, as every service names it."""

    INVALID_REQUEST = "invalid_request"  # the caller's input cannot be served (`field` names it)
    MALFORMED_MESSAGE = "malformed_message"  # request bytes that do not parse as the method's message
    INVALID_KV = "invalid_kv"  # a KV payload malformed, damaged, or not for this model or request
    OVERLOADED = "overloaded"  # full now: try later or elsewhere (a retry hint may come along)
    UNAVAILABLE = "unavailable"  # not serving: shutting down, draining, no worker known, handed off
    NOT_FOUND = "not_found"  # no such request (or reservation) here
    MODEL_NOT_FOUND = "model_not_found"  # the request names a model the router does not serve
    UNKNOWN_PEER = "unknown_peer"  # a worker was asked to reach a worker of its cluster it does not know
    CANCELLED = "cancelled"  # the request was cancelled on the worker
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the request's deadline passed
    KV_LEASE_EXPIRED = "kv_lease_expired"  # a decode worker's reserved row got no KV in time and was released
    KV_PUSH_FAILED = "kv_push_failed"  # a prefill worker could not hand the KV to its decode worker
    PREFIX_EVICTED = "prefix_evicted"  # a KV push left out blocks the decode worker no longer holds
    UNAUTHENTICATED = "unauthenticated"  # no valid API key
    INTERNAL = "internal"  # a bug


class ServiceError(Exception):
    """An error that another process may act on: its `reason` says what happened, `retry_after_s` (optional)
    when trying again may succeed."""

    reason: ClassVar[Reason] = Reason.INTERNAL

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidRequestError(ServiceError, ValueError):
    """A request that cannot be served; `field` names the offending input (None: the request as a whole). Its
    text is "field: message"."""

    reason = Reason.INVALID_REQUEST

    def __init__(self, field_name: str | None, message: str) -> None:
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.field = field_name
        self.detail = message  # the message without the field


class MalformedMessage(ServiceError):
    """Bytes that do not parse as the method's request message (wrong type, invalid UTF-8, truncated ...)."""

    reason = Reason.MALFORMED_MESSAGE


class PayloadError(ServiceError, ValueError):
    """A KV payload that is malformed, damaged, or does not belong to this model or request."""

    reason = Reason.INVALID_KV


class Overloaded(ServiceError):
    reason = Reason.OVERLOADED


class Unavailable(ServiceError):
    reason = Reason.UNAVAILABLE


class NotFound(ServiceError):
    reason = Reason.NOT_FOUND


class ModelNotFound(NotFound):
    """A request for a model the router does not serve (OpenAI's and vLLM's `model_not_found`)."""

    reason = Reason.MODEL_NOT_FOUND


class Cancelled(ServiceError):
    reason = Reason.CANCELLED


class DeadlineExceeded(ServiceError, TimeoutError):
    reason = Reason.DEADLINE_EXCEEDED


class KvLeaseExpired(DeadlineExceeded):
    """A decode worker released a reserved row whose KV did not arrive within its lease."""

    reason = Reason.KV_LEASE_EXPIRED


class KvPushFailed(ServiceError):
    """A prefill worker's KV push failed on the decode side: `upstream` is the decode worker's reason (or
    UNAVAILABLE when it could not be reached). The prefill itself succeeded; another row may take the request."""

    reason = Reason.KV_PUSH_FAILED

    def __init__(self, message: str, upstream: Reason) -> None:
        super().__init__(message)
        self.upstream = upstream


class PrefixEvicted(ServiceError):
    """A KV push left out its prompt's first blocks because the decode worker's prefix cache held them (as the
    router last saw it), and the cache no longer holds them all: nothing was spliced; push the whole KV again."""

    reason = Reason.PREFIX_EVICTED


class UnknownPeer(ServiceError):
    """A prefill worker was asked to push KV to a decode worker it does not know (not in its --decode list or
    registry): it dials nothing. The router tries another prefill worker; a client never caused it."""

    reason = Reason.UNKNOWN_PEER


class Unauthenticated(ServiceError):
    reason = Reason.UNAUTHENTICATED


def reason_of(exc: BaseException) -> Reason:
    """The reason an exception stands for: its own, or for the standard ones what they mean here."""
    if isinstance(exc, ServiceError):
        return exc.reason
    if isinstance(exc, ValueError):
        return Reason.INVALID_REQUEST
    if isinstance(exc, TimeoutError):
        return Reason.DEADLINE_EXCEEDED
    return Reason.INTERNAL


_CLASSES: dict[Reason, type[ServiceError]] = {
    cls.reason: cls
    for cls in (MalformedMessage, PayloadError, Overloaded, Unavailable, NotFound, ModelNotFound, Cancelled,
                DeadlineExceeded, KvLeaseExpired, PrefixEvicted, UnknownPeer, Unauthenticated, ServiceError)
}


def error_of(reason: Reason, message: str, field: str | None = None, retry_after_s: float | None = None,
             upstream: Reason | None = None) -> ServiceError:
    """The error a reason stands for, as another process raised it (the inverse of the edges' mapping)."""
    if reason is Reason.INVALID_REQUEST:
        return InvalidRequestError(field, message)
    if reason is Reason.KV_PUSH_FAILED:
        return KvPushFailed(message, upstream or Reason.UNAVAILABLE)
    err = _CLASSES.get(reason, ServiceError)(message)
    err.retry_after_s = retry_after_s
    return err
