"""The prefill worker's gRPC face: a thin servicer over PrefillWorker that ships each KV payload straight to the
decode worker named in the request (DecodeWorker.PushKv). KV never passes through the router."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import grpc

from baton.engine.kv_payload import KVPayload
from baton.engine.request import InvalidRequestError, Request
from baton.rpc.convert import params_from_proto
from baton.rpc.kv_transfer import payload_messages
from baton.rpc.server import Overloaded, ServiceError, TlsConfig, Unavailable, channel
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.prefill.worker import PrefillCancelled, PrefillWorker, QueueFull, WorkerClosed

log = logging.getLogger(__name__)

SERVICE_NAME = "baton.v1.PrefillWorker"


class RequestCancelled(ServiceError):
    code = grpc.StatusCode.CANCELLED
    http_status = 499


class PushFailed(ServiceError):
    """The decode worker refused the KV or could not be reached: its status code, passed through."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ShipStats:
    shipped: int = 0  # payloads accepted by a decode worker
    push_failed: int = 0
    kv_bytes: int = 0
    transfer_seconds: float = 0.0


class PrefillWorkerServicer(baton_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker, push_timeout_s: float = 60.0, tls: TlsConfig | None = None) -> None:
        self.worker = worker
        self.push_timeout_s = push_timeout_s
        self.tls = tls  # mutual TLS to decode workers
        self.stats = ShipStats()
        self._channels: dict[str, grpc.aio.Channel] = {}  # decode address -> channel, reused
        self._pushing: dict[str, asyncio.Task[int]] = {}  # request id -> its KV push in progress
        self._cancel_asked: set[str] = set()
        self.in_flight = 0  # Prefill calls being handled, from validation to the end of their push

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        rid = request.request.request_id
        start = time.perf_counter()
        self.in_flight += 1
        try:
            return await self._prefill(request)
        except asyncio.CancelledError:
            log.info("prefill %s: cancelled by the caller after %.3fs", rid, time.perf_counter() - start,
                     extra={"request_id": rid})
            raise
        except Exception as e:
            log.info("prefill %s: failed after %.3fs: %s", rid, time.perf_counter() - start, e,
                     extra={"request_id": rid})
            raise
        finally:
            self.in_flight -= 1

    async def _prefill(self, request: pb.PrefillRequest) -> pb.PrefillResponse:
        wr = request.request
        rid = wr.request_id
        if not rid:
            raise InvalidRequestError("request_id", "required")
        if not request.decode_address:
            raise InvalidRequestError("decode_address", "required, the host:port of the decode worker")
        req = Request(rid, list(wr.prompt_ids), params_from_proto(wr.parameters), output_ids=list(wr.output_ids))
        try:
            future = self.worker.submit(req)
        except QueueFull as e:
            raise Overloaded(str(e), retry_after_s=1.0) from e
        except WorkerClosed as e:
            raise Unavailable(str(e)) from e
        try:
            result = await future  # if this RPC is cancelled, so is the future, which drops the prefill
        except PrefillCancelled as e:
            raise RequestCancelled(str(e)) from e
        start = time.perf_counter()
        push = asyncio.ensure_future(self._push(result.payload, request.decode_address))
        self._pushing[rid] = push
        try:
            kv_bytes = await push
        except asyncio.CancelledError:
            if rid in self._cancel_asked:  # by our Cancel RPC, not by the caller
                raise RequestCancelled(f"request {rid!r} was cancelled during its KV push") from None
            raise
        finally:
            self._pushing.pop(rid, None)
            self._cancel_asked.discard(rid)
        transfer_s = time.perf_counter() - start
        self.stats.shipped += 1
        self.stats.kv_bytes += kv_bytes
        self.stats.transfer_seconds += transfer_s
        self.worker.metrics.shipped(kv_bytes, transfer_s)
        log.info(
            "prefill %s: %d tokens, queued %.3fs, prefill %.3fs, %d KV bytes to %s in %.3fs",
            rid,
            req.prompt_len,
            result.queued_seconds,
            result.prefill_seconds,
            kv_bytes,
            request.decode_address,
            transfer_s,
            extra={"request_id": rid},
        )
        return pb.PrefillResponse(
            request_id=rid, kv_bytes=kv_bytes, prefill_seconds=result.prefill_seconds, transfer_seconds=transfer_s
        )

    async def _push(self, payload: KVPayload, address: str) -> int:
        """Send the payload to the decode worker; returns the bytes it acknowledged."""
        # The header goes first (the decode worker streams the first token from it); its checksum over every
        # byte takes a while, so it is made off the event loop. The chunks follow, cut as they are sent.
        messages = payload_messages(payload)
        header = await asyncio.to_thread(next, messages)
        stub = baton_pb2_grpc.DecodeWorkerStub(self._channel(address))
        try:
            reply: pb.PushKvResponse = await stub.PushKv(
                itertools.chain([header], messages), timeout=self.push_timeout_s
            )
        except grpc.aio.AioRpcError as e:
            self.stats.push_failed += 1
            self.worker.metrics.push_failures.inc()
            raise PushFailed(e.code(), f"KV push to decode worker {address} failed: {e.details()}") from e
        except BaseException:
            self.stats.push_failed += 1
            self.worker.metrics.push_failures.inc()
            raise
        return int(reply.received_bytes) or payload.nbytes

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = channel(address, self.tls)
        return self._channels[address]

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        rid = request.request_id
        found = self.worker.cancel(rid)
        push = self._pushing.get(rid)
        if push is not None and not push.done():
            self._cancel_asked.add(rid)
            push.cancel()
            found = True
        if found:
            log.info("prefill %s: cancelled", rid, extra={"request_id": rid})
        return pb.CancelResponse(found=found)

    async def Occupancy(self, request: pb.OccupancyRequest, context: grpc.aio.ServicerContext) -> pb.OccupancyResponse:
        return self.occupancy()

    def occupancy(self) -> pb.OccupancyResponse:
        occ = self.worker.occupancy()
        return pb.OccupancyResponse(
            waiting=occ.waiting, completed=self.stats.shipped, model_fingerprint=self.worker.lm.fingerprint
        )

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
