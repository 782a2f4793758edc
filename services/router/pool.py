"""The router's view of its workers: where they are, one gRPC channel to each, and their load fed to the
Scheduler every poll.

Workers come from one of two sources: static addresses given on the command line, each asked for its
Occupancy every poll; or a Redis registry (baton.rpc.registry), read every poll, where workers publish their
address and load themselves. Either way every worker must serve the same model: the router adopts the
fingerprint of the first worker it hears from and ignores, with a warning, any worker with another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import grpc

from baton.rpc.registry import RedisRegistry, WorkerInfo
from baton.rpc.server import channel
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.router.scheduler import Role, Scheduler, WorkerLoad

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(
        self,
        scheduler: Scheduler,
        decode: Sequence[str] = (),
        prefill: Sequence[str] = (),
        redis_url: str | None = None,
        poll_s: float = 0.2,
        fingerprint: str | None = None,
    ) -> None:
        if redis_url and (decode or prefill):
            raise ValueError("give worker addresses or a registry (--redis), not both")
        self.scheduler = scheduler
        self.static = {Role.DECODE: list(decode), Role.PREFILL: list(prefill)}
        self.registry = RedisRegistry(redis_url) if redis_url else None
        self.poll_s = poll_s
        self.fingerprint = fingerprint  # adopted from the first worker heard from when None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._warned: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None

    # ---- stubs -------------------------------------------------------------------------------------
    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = channel(address)
        return self._channels[address]

    def decode_stub(self, address: str) -> baton_pb2_grpc.DecodeWorkerStub:
        return baton_pb2_grpc.DecodeWorkerStub(self._channel(address))

    def prefill_stub(self, address: str) -> baton_pb2_grpc.PrefillWorkerStub:
        return baton_pb2_grpc.PrefillWorkerStub(self._channel(address))

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Poll once (so the first requests find workers), then keep polling in the background."""
        await self.poll()
        self._task = asyncio.create_task(self._run(), name="worker-pool")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        if self.registry is not None:
            await self.registry.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - polling must outlive any one failure
                log.exception("polling workers failed")

    # ---- polling -----------------------------------------------------------------------------------
    async def poll(self) -> None:
        """Refresh every worker's load in the scheduler."""
        for role in Role:
            if self.registry is not None:
                loads = await self._from_registry(role)
            else:
                loads = list(await asyncio.gather(*(self._ask(role, a) for a in self.static[role])))
            if loads is not None:
                self.scheduler.update(role, loads)

    async def _ask(self, role: Role, address: str) -> WorkerLoad:
        """One worker's Occupancy over gRPC; unhealthy when it cannot be reached or serves another model."""
        as_of = time.time()
        stub = self.decode_stub(address) if role is Role.DECODE else self.prefill_stub(address)
        try:
            resp = await stub.Occupancy(pb.OccupancyRequest(), timeout=max(1.0, 5 * self.poll_s))
        except grpc.aio.AioRpcError as e:
            self._warn_once(address, "unreachable", f"{role.value} worker {address} unreachable: {e.code().name}")
            return WorkerLoad(address, healthy=False, as_of=as_of)
        if (address, "unreachable") in self._warned:
            self._warned.discard((address, "unreachable"))
            log.info("%s worker %s reachable", role.value, address)
        load = WorkerLoad(
            address,
            free_rows=resp.free_rows,
            kv_tokens_free=resp.kv_tokens_free,
            waiting=resp.waiting,
            active_rows=resp.active_rows,
            kv_tokens_used=resp.kv_tokens_used,
            as_of=as_of,
        )
        load.healthy = self._same_model(role, address, resp.model_fingerprint)
        return load

    async def _from_registry(self, role: Role) -> list[WorkerLoad] | None:
        """The registry's workers of a role; None (keep the last known loads) while Redis cannot be read."""
        assert self.registry is not None
        try:
            infos = await self.registry.workers(role.value)
        except Exception as e:  # noqa: BLE001 - keep the last known loads while Redis is away
            self._warn_once(self.registry.url, "registry", f"registry {self.registry.url} unreadable: {e}")
            return None
        self._warned.discard((self.registry.url, "registry"))
        return [self._load_of(role, info) for info in infos]

    def _load_of(self, role: Role, info: WorkerInfo) -> WorkerLoad:
        occ = info.occupancy
        return WorkerLoad(
            info.address,
            free_rows=occ.get("free_rows", 0),
            kv_tokens_free=occ.get("kv_tokens_free", 0),
            waiting=occ.get("waiting", 0),
            active_rows=occ.get("active_rows", 0),
            kv_tokens_used=occ.get("kv_tokens_used", 0),
            healthy=self._same_model(role, info.address, info.model_fingerprint),
            as_of=info.updated_at,
        )

    def _same_model(self, role: Role, address: str, fingerprint: str) -> bool:
        if self.fingerprint is None and fingerprint:
            self.fingerprint = fingerprint
            log.info("serving model %s… (fingerprint of %s worker %s)", fingerprint[:12], role.value, address)
        if fingerprint == self.fingerprint:
            return True
        self._warn_once(
            address,
            "model",
            f"ignoring {role.value} worker {address}: it serves model {fingerprint[:12]}…, "
            f"not {(self.fingerprint or '')[:12]}…",
        )
        return False

    def _warn_once(self, key: str, kind: str, message: str) -> None:
        if (key, kind) not in self._warned:
            self._warned.add((key, kind))
            log.warning("%s", message)
