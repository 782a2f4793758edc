"""The decode worker's gRPC face: a thin servicer over DecodeWorker. Errors are raised as exceptions and turned
into gRPC status codes by baton.rpc.server.ErrorInterceptor."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator

import grpc

from baton.rpc.convert import (
    finish_to_proto,
    logprobs_from_proto,
    logprobs_to_proto,
    prompt_logprobs_from_proto,
    prompt_logprobs_to_proto,
    request_from_proto,
)
from baton.rpc.kv_transfer import payload_from_messages
from baton.rpc.server import Service
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.decode.worker import DecodeWorker

log = logging.getLogger(__name__)

SERVICE_NAME = "baton.v1.DecodeWorker"


class DecodeServicer(baton_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    async def Decode(  # noqa: N802 - gRPC method name
        self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DecodeResponse]:
        try:
            res = self.worker.reserve(request_from_proto(request.request), request.kv_timeout_seconds,
                                      request.prefill_here, max(1, request.request.n))
        except Exception as e:
            log.info("request %s refused: %s", request.request.request_id, e,
                     extra={"request_id": request.request.request_id})
            raise
        context.add_done_callback(lambda _: res.cancel())  # the call ended: a client gone away cancels the request
        try:
            yield pb.DecodeResponse()  # the row is reserved: the caller may have the KV pushed now (or prefill_here)
            async for ev in res.events():
                msg = pb.DecodeResponse(token_ids=ev.token_ids, logprobs=[logprobs_to_proto(lp) for lp in ev.logprobs],
                                        prompt_logprobs=prompt_logprobs_to_proto(ev.prompt_logprobs or []),
                                        index=ev.index)
                msg.finish_reason = finish_to_proto(ev.finish_reason)
                if ev.stop_text is not None:
                    msg.stop_text = ev.stop_text
                yield msg
        finally:
            res.cancel()  # no-op when the request ended; otherwise the call was cancelled or failed

    async def PushKv(  # noqa: N802
        self, request_iterator: AsyncIterable[pb.PushKvRequest], context: grpc.aio.ServicerContext
    ) -> pb.PushKvResponse:
        start = time.perf_counter()
        try:
            payload = await payload_from_messages(request_iterator, self._expect)
            self.worker.deliver_kv(payload)
        except Exception as e:
            log.info("KV push refused: %s", e)
            self.worker.metrics.kv_refused.inc()
            raise
        self.worker.metrics.kv_receive.observe(time.perf_counter() - start)
        self.worker.metrics.kv_received.inc(payload.nbytes)
        return pb.PushKvResponse(received_bytes=payload.nbytes)

    def _expect(self, h: pb.KvHeader) -> None:
        """Refuse a push from its header alone when this worker waits for no such KV (before its bytes come)."""
        res = self.worker.expect_kv(h.request_id, h.model_fingerprint, (h.num_layers, h.kv_heads, h.head_dim),
                                    list(h.prompt_ids), h.first_token, h.held_tokens)
        self.worker.announce_first_token(
            res, h.first_token, logprobs_from_proto(h.first_logprobs) if h.HasField("first_logprobs") else None,
            prompt_logprobs_from_proto(h.prompt_logprobs))

    async def Cancel(  # noqa: N802
        self, request: pb.CancelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelResponse:
        return pb.CancelResponse(found=self.worker.cancel(request.request_id))

    async def Occupancy(  # noqa: N802
        self, request: pb.OccupancyRequest, context: grpc.aio.ServicerContext
    ) -> pb.OccupancyResponse:
        return self.worker.occupancy().to_proto(self.worker.fingerprint)


def decode_service(worker: DecodeWorker) -> Service:
    return Service(DecodeServicer(worker), baton_pb2_grpc.add_DecodeWorkerServicer_to_server, SERVICE_NAME)
