"""Shipping a prefill's KV to the decode worker that waits for it (DecodeWorker.PushKv): the header first (the
decode worker streams the first token from it), then the tensor bytes in chunks (baton/rpc/kv_transfer.py), over
one cached channel per decode worker. KV never passes through the router.

A push the decode side refuses, or that cannot reach it, raises KvPushFailed carrying the decode side's reason:
the prefill itself succeeded, and the router places the request on another row. A push cancelled through
`cancel` raises Cancelled.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import grpc

from baton.engine.kv_payload import KVPayload
from baton.errors import Cancelled, KvPushFailed
from baton.metrics import PrefillMetrics
from baton.rpc.kv_transfer import payload_messages
from baton.rpc.server import ChannelCache, TlsConfig
from baton.rpc.status import error_from_rpc
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc


class KvShipper:
    def __init__(self, metrics: PrefillMetrics, push_timeout_s: float = 60.0, tls: TlsConfig | None = None,
                 internal_token: str | None = None) -> None:
        self.metrics = metrics
        self.push_timeout_s = push_timeout_s
        self.channels = ChannelCache(tls, internal_token)  # mutual TLS to decode workers when given
        self._pushing: dict[str, asyncio.Task[int]] = {}  # request id -> its push in progress
        self._cancel_asked: set[str] = set()

    async def ship(self, payload: KVPayload, address: str) -> tuple[int, float]:
        """Push the payload to the decode worker at `address`; returns the bytes it acknowledged and the seconds
        the push took."""
        rid = payload.request_id
        start = time.perf_counter()
        push = asyncio.ensure_future(self._push(payload, address))
        self._pushing[rid] = push
        try:
            kv_bytes = await push
        except asyncio.CancelledError:
            if rid in self._cancel_asked:  # by cancel(), not by the caller
                raise Cancelled(f"request {rid!r} was cancelled during its KV push") from None
            raise
        finally:
            self._pushing.pop(rid, None)
            self._cancel_asked.discard(rid)
        seconds = time.perf_counter() - start
        self.metrics.shipped(kv_bytes, seconds)
        return kv_bytes, seconds

    async def _push(self, payload: KVPayload, address: str) -> int:
        # The header's checksum over every byte takes a while, so it is made off the event loop; the chunks
        # follow, cut as they are sent.
        messages = payload_messages(payload)
        header = await asyncio.to_thread(next, messages)
        stub = baton_pb2_grpc.DecodeWorkerStub(self.channels.get(address))
        try:
            reply: pb.PushKvResponse = await stub.PushKv(
                itertools.chain([header], messages), timeout=self.push_timeout_s
            )
        except grpc.aio.AioRpcError as e:
            self.metrics.push_failures.inc()
            upstream = error_from_rpc(e)
            raise KvPushFailed(f"KV push to decode worker {address} failed: {upstream}", upstream.reason) from e
        except BaseException:
            self.metrics.push_failures.inc()
            raise
        return int(reply.received_bytes) or payload.nbytes

    def cancel(self, request_id: str) -> bool:
        """Stop the request's push in progress; False when there is none."""
        push = self._pushing.get(request_id)
        if push is None or push.done():
            return False
        self._cancel_asked.add(request_id)
        push.cancel()
        return True

    async def close(self) -> None:
        await self.channels.close()
