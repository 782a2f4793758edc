"""Errors across processes: over a real gRPC call every Baton error arrives as the same class, reason, field
and retry hint whatever its message says, and the decisions made on it (the router's, the HTTP status) follow
from those alone. (tests/test_resume.py runs the router's recoveries with reworded and misleading messages.)"""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from baton.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidRequestError,
    KvLeaseExpired,
    KvPushFailed,
    MalformedMessage,
    ModelNotFound,
    NotFound,
    Overloaded,
    PayloadError,
    PrefixEvicted,
    Reason,
    ServiceError,
    Unauthenticated,
    Unavailable,
    UnknownPeer,
    error_of,
    reason_of,
)
from baton.rpc.server import Service, channel, create_server
from baton.rpc.status import CODES, error_from_rpc
from baton.serve import free_port
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.router.openai_schema import HTTP_STATUS, api_error

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=40)


def make_errors(message: str, field: str) -> list[ServiceError]:
    return [
        InvalidRequestError(field, message), MalformedMessage(message), PayloadError(message),
        Overloaded(message, retry_after_s=0.25), Unavailable(message), NotFound(message), ModelNotFound(message),
        Cancelled(message), DeadlineExceeded(message), KvLeaseExpired(message), KvPushFailed(message, Reason.NOT_FOUND),
        PrefixEvicted(message), UnknownPeer(message), Unauthenticated(message), ServiceError(message),
    ]


class Raiser(baton_pb2_grpc.PrefillWorkerServicer):
    """Raises, from its Cancel handler, whatever error it is given (the ErrorInterceptor ends the call)."""

    error: Exception = ServiceError("unset")

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:  # noqa: N802
        raise self.error


def test_every_reason_has_a_class_a_status_and_an_http_status() -> None:
    kinds = make_errors("m", "f")
    assert {e.reason for e in kinds} == set(Reason)
    for e in kinds:
        assert reason_of(e) is e.reason and e.reason in HTTP_STATUS
        assert e.reason is Reason.KV_PUSH_FAILED or e.reason in CODES
        back = error_of(e.reason, "m", "f", upstream=Reason.NOT_FOUND)
        assert type(back) is type(e)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=TEXT, field=st.from_regex(r"[a-z_]{1,12}", fullmatch=True))
def test_over_grpc_an_error_keeps_its_reason_field_and_hint_whatever_its_words(message: str, field: str) -> None:
    async def main() -> None:
        raiser = Raiser()
        address = f"127.0.0.1:{free_port()}"
        server, _ = create_server([Service(raiser, baton_pb2_grpc.add_PrefillWorkerServicer_to_server, "p")],
                                  address)
        await server.start()
        ch = channel(address)
        try:
            for sent in make_errors(message, field):
                raiser.error = sent
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await baton_pb2_grpc.PrefillWorkerStub(ch).Cancel(pb.CancelRequest(request_id="x"), timeout=10)
                got = error_from_rpc(e.value)
                assert type(got) is type(sent) and got.reason is sent.reason, (sent, got)
                assert got.retry_after_s == sent.retry_after_s
                if isinstance(sent, InvalidRequestError):
                    assert isinstance(got, InvalidRequestError) and got.field == field
                    assert api_error(got, {}).param == field  # the HTTP edge names the same field
                if isinstance(sent, KvPushFailed):
                    assert isinstance(got, KvPushFailed) and got.upstream is Reason.NOT_FOUND
                assert api_error(got, {}).status == HTTP_STATUS[sent.reason]
        finally:
            await ch.close()
            await server.stop(None)

    asyncio.run(main())


def test_a_call_without_baton_metadata_gets_the_reason_of_its_status_code() -> None:
    async def main() -> None:
        ch = channel(f"127.0.0.1:{free_port()}")  # nobody listens: the transport fails, no handler ran
        try:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await baton_pb2_grpc.PrefillWorkerStub(ch).Cancel(pb.CancelRequest(request_id="x"), timeout=5)
            assert isinstance(error_from_rpc(e.value), Unavailable)
        finally:
            await ch.close()

    asyncio.run(main())
