"""The worker registry against a real redis-server started on a free port."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from baton.rpc.load import DecodeLoad
from baton.rpc.registry import RedisRegistry, WorkerInfo, heartbeat
from baton.serve import free_port
from baton.v1 import baton_pb2 as pb

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")




class RedisServer:
    """A throwaway redis-server that can be stopped and started again on the same port."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def info(role: str, address: str, waiting: int = 0) -> WorkerInfo:
    return WorkerInfo(role, address, "fp", {"waiting": waiting})


def test_worker_info_json_round_trip() -> None:
    w = WorkerInfo("decode", "10.0.0.1:50072", "abc", {"active_rows": 3, "free_rows": 5}, 123.5)
    assert WorkerInfo.from_json(w.to_json()) == w
    with pytest.raises(ValueError):
        WorkerInfo.from_json('{"role": "decode"}')
    with pytest.raises(ValueError):
        WorkerInfo.from_json("not json")


def test_a_load_in_proto_and_registry_form() -> None:
    load = DecodeLoad.from_proto(pb.OccupancyResponse(active_rows=2, waiting=1, kv_received=7, model_fingerprint="x"))
    assert DecodeLoad.from_registry(load.to_registry()) == load
    assert load.to_proto("x") == pb.OccupancyResponse(active_rows=2, waiting=1, kv_received=7, model_fingerprint="x")
    occ = load.to_registry()
    assert occ == {
        "active_rows": 2,
        "free_rows": 0,
        "kv_tokens_used": 0,
        "kv_tokens_free": 0,
        "waiting": 1,
        "completed": 0,
        "kv_received": 7,
        "tokens_generated": 0,
        "prefix_blocks": [],
    }


@pytest.mark.asyncio
async def test_publish_list_remove_and_roles(redis_server: RedisServer) -> None:
    reg = RedisRegistry(redis_server.url, prefix="t")
    try:
        await reg.publish(info("prefill", "p1:1", waiting=2), ttl_s=30)
        await reg.publish(info("decode", "d2:2"), ttl_s=30)
        await reg.publish(info("decode", "d1:1"), ttl_s=30)
        prefill = await reg.workers("prefill")
        assert [w.address for w in prefill] == ["p1:1"]
        assert prefill[0].load == {"waiting": 2}
        assert [w.address for w in await reg.workers("decode")] == ["d1:1", "d2:2"]
        # refreshing replaces the record
        await reg.publish(info("prefill", "p1:1", waiting=5), ttl_s=30)
        assert [w.load["waiting"] for w in await reg.workers("prefill")] == [5]
        await reg.remove("decode", "d1:1")
        assert [w.address for w in await reg.workers("decode")] == ["d2:2"]
        # another prefix is another cluster
        other = RedisRegistry(redis_server.url, prefix="u")
        try:
            assert await other.workers("decode") == []
        finally:
            await other.close()
    finally:
        await reg.close()


@pytest.mark.asyncio
async def test_records_expire_by_ttl(redis_server: RedisServer) -> None:
    reg = RedisRegistry(redis_server.url)
    try:
        await reg.publish(info("decode", "short:1"), ttl_s=1.0)
        await reg.publish(info("decode", "long:1"), ttl_s=30)
        assert len(await reg.workers("decode")) == 2
        await asyncio.sleep(1.5)
        assert [w.address for w in await reg.workers("decode")] == ["long:1"]
    finally:
        await reg.close()


@pytest.mark.asyncio
async def test_heartbeat_publishes_refreshes_and_removes_on_stop(redis_server: RedisServer) -> None:
    reg = RedisRegistry(redis_server.url)
    stop = asyncio.Event()
    beats = 0

    def make() -> WorkerInfo:
        nonlocal beats
        beats += 1
        return info("prefill", "hb:1", waiting=beats)

    # TTL of 0.5s: generous, so that a loaded machine delaying a beat does not make the record expire
    task = asyncio.create_task(heartbeat(reg, make, interval_s=0.05, stop=stop, ttl_factor=10))
    try:
        await wait_until(reg, "prefill", lambda ws: bool(ws) and ws[0].load["waiting"] >= 3)
        # well past the TTL: still there because it is refreshed
        await asyncio.sleep(1.2)
        assert [w.address for w in await reg.workers("prefill")] == ["hb:1"]
        stop.set()
        await asyncio.wait_for(task, 5)
        assert await reg.workers("prefill") == []
    finally:
        stop.set()
        await reg.close()


@pytest.mark.asyncio
async def test_heartbeat_publishes_a_changed_load_soon_and_at_most_every_min_gap(redis_server: RedisServer) -> None:
    """A worker's load changes: its record follows within about min_gap_s, not a heartbeat interval later (routers
    sharing the registry see one another's assignments there); changes many times a gap publish once a gap."""
    reg = RedisRegistry(redis_server.url)
    stop, changed = asyncio.Event(), asyncio.Event()
    load = beats = 0

    def make() -> WorkerInfo:
        nonlocal beats
        beats += 1
        return info("decode", "d:1", waiting=load)

    task = asyncio.create_task(heartbeat(reg, make, interval_s=60.0, stop=stop, changed=changed, min_gap_s=0.1))
    try:
        await wait_until(reg, "decode", lambda ws: len(ws) == 1)
        load = 1
        changed.set()
        await wait_until(reg, "decode", lambda ws: ws[0].load["waiting"] == 1, timeout_s=3.0)  # not 60 s
        first = beats
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.0:  # changes every 10 ms for a second
            load += 1
            changed.set()
            await asyncio.sleep(0.01)
        assert beats - first <= 1.0 / 0.1 + 2, "at most one publish per min_gap_s"
        await wait_until(reg, "decode", lambda ws: ws[0].load["waiting"] == load, timeout_s=3.0)
        settled = beats
        await asyncio.sleep(0.5)  # no change since: no publish before the interval (the change was cleared)
        assert beats - settled <= 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await reg.close()


@pytest.mark.asyncio
async def test_heartbeat_survives_redis_restart(redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    reg = RedisRegistry(redis_server.url)
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeat(reg, lambda: info("decode", "d:1"), interval_s=0.05, stop=stop))
    try:
        await wait_until(reg, "decode", lambda ws: len(ws) == 1)
        redis_server.stop()  # loses everything: no persistence
        await asyncio.sleep(0.3)  # several failed beats, one warning
        assert not task.done()
        warnings = [r for r in caplog.records if "cannot publish" in r.getMessage()]
        assert len(warnings) == 1
        redis_server.start()
        await wait_until(reg, "decode", lambda ws: [w.address for w in ws] == ["d:1"])
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await reg.close()


@pytest.mark.asyncio
async def test_heartbeat_stops_even_when_redis_is_down() -> None:
    reg = RedisRegistry(f"redis://127.0.0.1:{free_port()}/0")
    stop = asyncio.Event()
    task = asyncio.create_task(heartbeat(reg, lambda: info("decode", "d:1"), interval_s=0.05, stop=stop))
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.wait_for(task, 10)
    await reg.close()


async def wait_until(
    reg: RedisRegistry, role: str, ok: Callable[[list[WorkerInfo]], bool], timeout_s: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ok(await reg.workers(role)):
                return
        except Exception:  # noqa: BLE001 - Redis may be restarting
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"registry never reached the expected state for {role}")
        await asyncio.sleep(0.05)
