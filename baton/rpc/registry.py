"""The worker registry: workers publish who they are and how loaded they are to Redis; the router reads it.

Each worker owns one key, `{prefix}:worker:{role}:{address}` (the prefix, `--redis-prefix`, tells clusters that
share one Redis apart), holding a WorkerInfo as JSON and set with a TTL a
few heartbeats long. A worker that stops heartbeating (crashed, partitioned) simply expires; one that stops
cleanly removes its key. Redis being down never stops a worker: heartbeat() warns once and keeps trying.

A heartbeat also publishes soon after what routers choose by changes (the worker's `changed` event: a decode
worker's rows, KV budget, queue or cached blocks), at most every MIN_PUBLISH_GAP_S: routers choose by load and by
the prefixes a worker holds, and several routers sharing one registry see one another's assignments only there,
so a record a whole interval old had them choose apart (Dynamo's workers publish load and KV events as they
happen, for the same reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

log = logging.getLogger(__name__)

TTL_FACTOR = 3.0  # a worker's record lives this many heartbeat intervals after its last heartbeat
MIN_PUBLISH_GAP_S = 0.1  # publishing on every load change: at most this often

@dataclass
class WorkerInfo:
    """What a worker publishes about itself."""

    role: str  # Role.value: "prefill" | "decode"
    address: str  # host:port that other services dial
    model_fingerprint: str
    load: dict[str, Any] = field(default_factory=dict)  # the worker's DecodeLoad or PrefillLoad, to_registry()
    updated_at: float = field(default_factory=time.time)  # time.time() of the publishing

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: str | bytes) -> WorkerInfo:
        """Raises ValueError on anything that is not a WorkerInfo."""
        try:
            obj = json.loads(data)
            return cls(
                role=str(obj["role"]),
                address=str(obj["address"]),
                model_fingerprint=str(obj["model_fingerprint"]),
                load={str(k): v for k, v in dict(obj.get("load") or {}).items()},  # typed by from_registry
                updated_at=float(obj["updated_at"]),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"not a WorkerInfo: {e}") from e


def _glob_escape(s: str) -> str:
    """Escape Redis glob metacharacters so `s` matches only itself in a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in s)


class RedisRegistry:
    """WorkerInfo records in Redis, one key per worker, expiring unless refreshed."""

    def __init__(self, url: str, prefix: str = "baton") -> None:
        self.url = url
        self.prefix = prefix
        # Fail fast when Redis is down: the heartbeat retries on its own schedule.
        self._redis = aioredis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 1)
        )

    def key(self, role: str, address: str) -> str:
        return f"{self.prefix}:worker:{role}:{address}"

    async def publish(self, info: WorkerInfo, ttl_s: float) -> None:
        """Create or refresh the worker's record; it expires after ttl_s unless published again."""
        await self._redis.set(self.key(info.role, info.address), info.to_json(), px=max(1, int(ttl_s * 1000)))

    async def workers(self, role: str) -> list[WorkerInfo]:
        """Live workers of one role, sorted by address. Expired records are gone; malformed ones are skipped."""
        pattern = f"{_glob_escape(self.prefix)}:worker:{_glob_escape(role)}:*"
        keys = [k async for k in self._redis.scan_iter(match=pattern, count=500)]
        if not keys:
            return []
        found: list[WorkerInfo] = []
        for key, value in zip(keys, await self._redis.mget(keys)):
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                info = WorkerInfo.from_json(value)
            except ValueError as e:
                log.warning("registry: skipping %r: %s", key, e)
                continue
            if info.role == role:
                found.append(info)
        return sorted(found, key=lambda w: w.address)

    async def server_id(self) -> str:
        """The Redis server's run id: a new one means Redis restarted, and records not yet published again are
        missing although their workers are alive."""
        info = await self._redis.info("server")
        return str(info.get("run_id", ""))

    async def remove(self, role: str, address: str) -> None:
        await self._redis.delete(self.key(role, address))

    async def close(self) -> None:
        await self._redis.aclose()


async def heartbeat(
    registry: RedisRegistry,
    make_info: Callable[[], WorkerInfo],
    interval_s: float,
    stop: asyncio.Event,
    ttl_factor: float = TTL_FACTOR,
    changed: asyncio.Event | None = None,
    min_gap_s: float = MIN_PUBLISH_GAP_S,
) -> None:
    """Publish make_info() every interval_s, and after `changed` is set (no sooner than min_gap_s after the last
    publish; it is cleared then), until `stop` is set, then remove the record.

    The record lives ttl_factor intervals, so a worker that dies drops out of the registry within that time.
    While Redis is unreachable this warns once and keeps trying; the worker re-registers when Redis returns.
    """
    ttl_s = interval_s * ttl_factor
    failing = False
    last: WorkerInfo | None = None
    while not stop.is_set():
        try:
            last = make_info()
            await registry.publish(last, ttl_s)
            if failing:
                log.info("registry %s reachable again: registered %s %s", registry.url, last.role, last.address)
            failing = False
        except Exception as e:  # noqa: BLE001 - a heartbeat must outlive any Redis trouble
            if not failing:
                log.warning("registry %s: cannot publish (%s); will keep trying", registry.url, e)
            failing = True
        await _next_beat(stop, changed, interval_s, min_gap_s)
    if last is not None:
        try:
            await registry.remove(last.role, last.address)
        except Exception as e:  # noqa: BLE001
            log.warning(
                "registry %s: cannot remove %s %s (%s); it expires on its own", registry.url, last.role, last.address, e
            )


async def _next_beat(stop: asyncio.Event, changed: asyncio.Event | None, interval_s: float, min_gap_s: float) -> None:
    """Return when the next heartbeat is due: interval_s from now, when `stop` is set, or min_gap_s from now at
    the earliest once `changed` is set (cleared as this returns for it)."""
    loop = asyncio.get_running_loop()
    due = loop.time() + interval_s
    if changed is not None:  # no sooner than min_gap_s after the last publish
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(min_gap_s, interval_s))
    waits = [asyncio.ensure_future(e.wait()) for e in (stop, changed) if e is not None]
    try:
        await asyncio.wait(waits, timeout=max(0.0, due - loop.time()), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    if changed is not None:
        changed.clear()
