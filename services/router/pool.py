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

from baton.rpc.load import LOAD_TYPES, Role
from baton.rpc.registry import RedisRegistry, WorkerInfo
from baton.rpc.server import ChannelCache, TlsConfig
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.router.scheduler import Scheduler, WorkerReport

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(
        self,
        scheduler: Scheduler,
        decode: Sequence[str] = (),
        prefill: Sequence[str] = (),
        redis_url: str | None = None,
        poll_s: float = 0.2,
        redis_prefix: str = "baton",
        fingerprint: str | None = None,
        tls: TlsConfig | None = None,
        restart_grace_s: float = 5.0,
        internal_token: str | None = None,
    ) -> None:
        if redis_url and (decode or prefill):
            raise ValueError("give worker addresses or a registry (--redis), not both")
        self.scheduler = scheduler
        self.static = {Role.DECODE: list(decode), Role.PREFILL: list(prefill)}
        self.registry = RedisRegistry(redis_url, prefix=redis_prefix) if redis_url else None
        self.poll_s = poll_s
        self.fingerprint = fingerprint  # adopted from the first worker heard from when None
        self.channels = ChannelCache(tls, internal_token)  # every call carries the token; mutual TLS when given
        self.restart_grace_s = restart_grace_s
        self._known: dict[Role, dict[str, WorkerReport]] = {role: {} for role in Role}  # from the last registry read
        self._redis_id: str | None = None
        self._keep_until = 0.0  # (monotonic) Redis restarted: until then, workers missing from it are kept
        self._gone: dict[str, asyncio.Event] = {}  # decode address -> set when that worker leaves the registry
        self._probes: dict[str, asyncio.Task[None]] = {}
        self._warned: set[tuple[str, str]] = set()
        self._task: asyncio.Task[None] | None = None

    # ---- stubs -------------------------------------------------------------------------------------
    def decode_stub(self, address: str) -> baton_pb2_grpc.DecodeWorkerStub:
        return baton_pb2_grpc.DecodeWorkerStub(self.channels.get(address))

    def prefill_stub(self, address: str) -> baton_pb2_grpc.PrefillWorkerStub:
        return baton_pb2_grpc.PrefillWorkerStub(self.channels.get(address))

    # ---- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Poll once (so the first requests find workers), then keep polling in the background."""
        await self.poll()
        self._task = asyncio.create_task(self._run(), name="worker-pool")

    async def close(self) -> None:
        for probe in list(self._probes.values()):
            probe.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.channels.close()
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
        if self.registry is not None:
            await self._poll_registry()
            return
        for role in Role:
            self.scheduler.update(role, list(await asyncio.gather(*(self._ask(role, a) for a in self.static[role]))))

    def gone(self, address: str) -> asyncio.Event:
        """Set when the decode worker at `address` leaves the registry (it missed its heartbeats, or stopped):
        requests still streaming from it are resumed elsewhere. (Without a registry a dead worker's streams
        break on their own, at the latest when gRPC keepalive gives up on its connection.)"""
        return self._gone.setdefault(address, asyncio.Event())

    async def _confirm_gone(self, address: str, timeout_s: float = 2.0) -> None:
        """A decode worker left the registry. It is gone if it does not answer either; one that answers only missed
        heartbeats (a busy machine, Redis trouble on its side), and its requests stay where they are."""
        try:
            await self.decode_stub(address).Occupancy(pb.OccupancyRequest(), timeout=timeout_s)
            log.info("decode worker %s left the registry but still answers: its requests stay", address)
        except grpc.aio.AioRpcError as e:
            log.warning("decode worker %s left the registry and does not answer (%s): resuming its requests elsewhere",
                        address, e.code().name)
            self.lost(address)
        finally:
            self._probes.pop(address, None)

    def lost(self, address: str) -> None:
        """The worker at `address` is gone: wake the requests waiting on it (a worker that comes back later
        under the same address starts with a fresh event)."""
        event = self._gone.pop(address, None)
        if event is not None:
            event.set()

    async def _ask(self, role: Role, address: str) -> WorkerReport:
        """One worker's Occupancy over gRPC; unhealthy when it cannot be reached or serves another model."""
        as_of = time.time()
        stub = self.decode_stub(address) if role is Role.DECODE else self.prefill_stub(address)
        try:
            resp = await stub.Occupancy(pb.OccupancyRequest(), timeout=max(1.0, 5 * self.poll_s))
        except grpc.aio.AioRpcError as e:
            self._warn_once(address, "unreachable", f"{role.value} worker {address} unreachable: {e.code().name}")
            return WorkerReport(address, LOAD_TYPES[role](), healthy=False, as_of=as_of)
        if (address, "unreachable") in self._warned:
            self._warned.discard((address, "unreachable"))
            log.info("%s worker %s reachable", role.value, address)
        return WorkerReport(address, LOAD_TYPES[role].from_proto(resp),
                            self._same_model(role, address, resp.model_fingerprint), as_of)

    async def _poll_registry(self) -> None:
        """The registry's workers. Redis failing never costs a worker: while it cannot be read the last known
        loads stay; when it comes back restarted (empty), workers missing from it are kept for restart_grace_s,
        time for their heartbeats to publish them again. Otherwise a worker missing from it is gone."""
        assert self.registry is not None
        try:
            server_id = await self.registry.server_id()
            infos = {role: await self.registry.workers(role.value) for role in Role}
        except Exception as e:  # noqa: BLE001 - keep the last known loads while Redis is away
            self._warn_once(self.registry.url, "registry", f"registry {self.registry.url} unreadable: {e}")
            return
        if (self.registry.url, "registry") in self._warned:
            self._warned.discard((self.registry.url, "registry"))
            log.info("registry %s readable again", self.registry.url)
        now = time.monotonic()
        if self._redis_id is not None and server_id != self._redis_id:
            self._keep_until = now + self.restart_grace_s
            log.warning("registry %s restarted: keeping the known workers for %gs while they register again",
                        self.registry.url, self.restart_grace_s)
        self._redis_id = server_id
        for role in Role:
            loads = {info.address: self._report_of(role, info) for info in infos[role]}
            if now < self._keep_until:
                for address, load in self._known[role].items():
                    loads.setdefault(address, load)
            for address in self._known[role].keys() - loads.keys():
                log.info("%s worker %s left the registry", role.value, address)
                if role is Role.DECODE and address in self._gone and address not in self._probes:
                    self._probes[address] = asyncio.create_task(self._confirm_gone(address))
            self._known[role] = loads
            self.scheduler.update(role, list(loads.values()))

    def _report_of(self, role: Role, info: WorkerInfo) -> WorkerReport:
        return WorkerReport(info.address, LOAD_TYPES[role].from_registry(info.load),
                            self._same_model(role, info.address, info.model_fingerprint), info.updated_at)

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
