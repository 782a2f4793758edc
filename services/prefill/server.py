"""The prefill worker's gRPC face: a thin servicer over PrefillWorker (services/prefill/worker.py), which
prefills each request and pushes its KV straight to the decode worker named in the request. Errors are raised
as exceptions and turned into gRPC status by baton.rpc.server.ErrorInterceptor."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from baton.errors import InvalidRequestError
from baton.rpc.convert import request_from_proto
from baton.rpc.server import Service
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.prefill.worker import PrefillWorker

log = logging.getLogger(__name__)

SERVICE_NAME = "baton.v1.PrefillWorker"


class PrefillWorkerServicer(baton_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:  # noqa: N802
        wr = request.request
        rid = wr.request_id
        start = time.perf_counter()
        try:
            req = request_from_proto(wr)
            if not request.decode_address:
                raise InvalidRequestError("decode_address", "required, the host:port of the decode worker")
            shipped = await self.worker.prefill(req, request.decode_address, request.held_tokens)
        except asyncio.CancelledError:
            log.info("prefill %s: cancelled by the caller after %.3fs", rid, time.perf_counter() - start,
                     extra={"request_id": rid})
            raise
        except Exception as e:
            log.info("prefill %s: failed after %.3fs: %s", rid, time.perf_counter() - start, e,
                     extra={"request_id": rid})
            raise
        result = shipped.result
        log.info(
            "prefill %s: %d tokens, queued %.3fs, prefill %.3fs, %d KV bytes to %s in %.3fs",
            rid, req.prompt_len, result.queued_seconds, result.prefill_seconds, shipped.kv_bytes,
            request.decode_address, shipped.transfer_seconds,
            extra={"request_id": rid},
        )
        return pb.PrefillResponse(request_id=rid, kv_bytes=shipped.kv_bytes, prefill_seconds=result.prefill_seconds,
                                  transfer_seconds=shipped.transfer_seconds)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:  # noqa: N802
        found = self.worker.cancel(request.request_id)
        if found:
            log.info("prefill %s: cancelled", request.request_id, extra={"request_id": request.request_id})
        return pb.CancelResponse(found=found)

    async def Occupancy(  # noqa: N802
        self, request: pb.OccupancyRequest, context: grpc.aio.ServicerContext
    ) -> pb.OccupancyResponse:
        return self.worker.occupancy().to_proto(self.worker.fingerprint)


def prefill_service(worker: PrefillWorker) -> Service:
    return Service(PrefillWorkerServicer(worker), baton_pb2_grpc.add_PrefillWorkerServicer_to_server, SERVICE_NAME)
