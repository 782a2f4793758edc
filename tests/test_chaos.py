"""Nothing lost: the whole system as real processes (router, 2 prefill and 2 decode workers, a real Redis) through
cancellations under load, a decode worker killed mid-generation, a drain that hands requests off, a prefill worker
killed, Redis restarted, and at the end the chaos test: sustained load while a decode worker, a prefill worker and
Redis are killed at random moments. Every request must complete, identical to an undisturbed run, and no worker
may hold a row or KV afterwards.

`pytest -m chaos tests/test_chaos.py` runs the chaos test alone; BATON_CHAOS_SEED, BATON_CHAOS_REQUESTS and
BATON_CHAOS_OUT (a JSON file for the numbers, see docs/reliability.md) tune and record it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from baton.engine.models import LoadedModel
from baton.rpc.registry import RedisRegistry
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from tests.support.cluster import Cluster, Outcome, prompts, request, run_all
from tests.support.oracle import reference
from tests.support.processes import wait_idle

DRAIN_S = 0.5


@pytest.fixture(scope="module")
def cluster(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster.create(tiny_llama_dir, tmp_path_factory.mktemp("chaos-logs"), drain_s=DRAIN_S)
    try:
        c.start_all()
        wait_known(c)
        yield c
    finally:
        c.stop_all()


def registered(c: Cluster) -> set[str]:
    async def ask() -> set[str]:
        reg = RedisRegistry(c.redis_url)
        try:
            return {w.address for role in ("decode", "prefill") for w in await reg.workers(role)}
        finally:
            await reg.close()

    try:
        return asyncio.run(ask())
    except Exception:  # noqa: BLE001 - Redis away
        return set()


def wait_known(c: Cluster, timeout: float = 30.0) -> None:
    """Until every live worker is in the registry, and the router has read it since."""
    want = {c.address(n) for n in c.workers if c.alive(n)}
    deadline = time.monotonic() + timeout
    while not want <= registered(c):
        assert time.monotonic() < deadline, f"workers not registered: {want - registered(c)}"
        time.sleep(0.1)
    time.sleep(0.5)  # a few router polls


def recoveries(c: Cluster, prefix: str) -> list[list[str]]:
    """The failures recovered from, per request whose id starts with `prefix` (from the router's request log)."""
    return [line["recoveries"] for line in c.router_lines()
            if line["request_id"].startswith(prefix) and "recoveries" in line]


async def until_streaming(outs: list[Outcome], task: asyncio.Future[Any], tokens: int) -> None:
    while not all(len(o.tokens) >= tokens or o.finish for o in outs):
        assert not task.done(), [o.error for o in outs if o.error]
        await asyncio.sleep(0.005)


# ---- cancellation under load ----------------------------------------------------------------------------------
def test_cancellations_under_load_leave_nothing_behind(cluster: Cluster) -> None:
    rng = random.Random(5)
    ps = prompts(40, seed=5)
    counts = {"grpc": 0, "http": 0}

    async def grpc_one(stub: baton_pb2_grpc.RouterStub, i: int) -> None:
        call = stub.GenerateStream(request(f"cx-{i}", ps[i % len(ps)], 400))

        async def read() -> None:
            async for _ in call:
                pass

        try:  # cancelled at a random moment: waiting in the queue, prefilling, or decoding
            await asyncio.wait_for(read(), rng.uniform(0.0, 3.0))
        except asyncio.TimeoutError:
            counts["grpc"] += 1
        call.cancel()

    async def http_one(client: httpx.AsyncClient, i: int) -> None:
        body = {"prompt": f"request {i} of many", "max_tokens": 400, "stream": True,
                "ignore_eos": True}

        async def read() -> None:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for _ in r.aiter_lines():
                    pass

        try:  # the client goes away at a random moment
            await asyncio.wait_for(read(), rng.uniform(0.0, 3.0))
        except asyncio.TimeoutError:
            counts["http"] += 1

    async def main() -> None:
        async with grpc.aio.insecure_channel(cluster.router) as ch, httpx.AsyncClient(
            base_url=cluster.http, timeout=60, limits=httpx.Limits(max_connections=200)
        ) as client:
            stub = baton_pb2_grpc.RouterStub(ch)
            await asyncio.gather(*(grpc_one(stub, i) for i in range(200)), *(http_one(client, i) for i in range(100)))

    asyncio.run(main())
    assert counts["grpc"] > 150 and counts["http"] > 60, counts  # (the rest finished first)
    wait_idle(cluster.decode, cluster.prefill, timeout=60)


# ---- a decode worker killed mid-generation ------------------------------------------------------------------
def test_a_decode_worker_killed_mid_generation_loses_nothing(cluster: Cluster, tiny_llama: LoadedModel) -> None:
    """Greedy, seeded sampling and stop strings: the outputs equal an undisturbed run, token for token."""
    tok = tiny_llama.tokenizer
    assert tok is not None
    ps = prompts(16, seed=7)
    max_new = 160
    texts = [o.text for o in asyncio.run(run_all(cluster.router, [request(f"t-{i}", p, 40) for i, p in
                                                                   enumerate(ps[12:])]))]
    stops = [t[20:23] for t in texts]  # a stop string some way into each of the last four outputs

    def batch(tag: str) -> list[pb.GenerateRequest]:
        out = []
        for i, p in enumerate(ps):
            params: dict[str, Any] = {}
            if i % 4 == 1:
                params = {"temperature": 0.8, "top_k": 40, "seed": 100 + i}
            elif i % 4 == 3:
                params = {"temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.2, "seed": 7 * i}
            if i >= 12:
                params = {"stop": [stops[i - 12]]}
            out.append(request(f"{tag}-{i}", p, max_new, **params))
        return out

    calm = asyncio.run(run_all(cluster.router, batch("calm")))
    assert not any(o.error for o in calm)

    async def disturbed() -> list[Outcome]:
        reqs = batch("hit")
        outs = [Outcome() for _ in reqs]
        task = asyncio.ensure_future(run_all(cluster.router, reqs, outs))
        await until_streaming(outs, task, 3)
        cluster.kill("decode0")
        await task
        return outs

    hit = asyncio.run(disturbed())
    for i, (a, b) in enumerate(zip(calm, hit)):
        assert b.error is None, (i, b.error)
        assert (b.tokens, b.text, b.finish, b.usage) == (a.tokens, a.text, a.finish, a.usage), i
    assert any(o.finish == pb.FINISH_REASON_STOP for o in hit[12:])
    resumed = recoveries(cluster, "hit-")
    assert resumed and all("decode worker" in r[0] for r in resumed), resumed
    wait_idle(cluster.decode[1:], cluster.prefill)
    cluster.start("decode0")
    wait_known(cluster)


# ---- drain: SIGTERM, running requests handed off past --drain-s -----------------------------------------------
def test_sigterm_drains_and_hands_off_what_does_not_finish(cluster: Cluster, tiny_llama: LoadedModel) -> None:
    ps = prompts(8, seed=11)
    max_new = 300
    reqs = [request(f"drain-{i}", p, max_new) for i, p in enumerate(ps)]

    async def main() -> int:
        outs = [Outcome() for _ in reqs]
        task = asyncio.ensure_future(run_all(cluster.router, reqs, outs))
        await until_streaming(outs, task, 2)
        code = await asyncio.to_thread(cluster.terminate, "decode1")
        await task
        for i, o in enumerate(outs):
            ref = reference(tiny_llama, ps[i], max_new)
            assert o.error is None, (i, o.error)
            assert o.tokens == ref, (i, len(o.tokens), [k for k, (a, b) in enumerate(zip(o.tokens, ref)) if a != b][:3])
        return code

    assert asyncio.run(main()) == 0
    handed = recoveries(cluster, "drain-")
    assert handed and all("handed off" in r[0] for r in handed), handed
    assert cluster.address("decode1") not in registered(cluster)
    wait_idle(cluster.decode[:1], cluster.prefill)
    cluster.start("decode1")
    wait_known(cluster)


# ---- a prefill worker killed, Redis restarted --------------------------------------------------------------
def test_a_prefill_worker_killed_and_redis_restarted_cost_no_request(
    cluster: Cluster, tiny_llama: LoadedModel
) -> None:
    ps = prompts(20, seed=13)
    reqs = [request(f"pr-{i}", ps[i % 20], 24 + 8 * (i % 3)) for i in range(80)]

    async def main() -> list[Outcome]:
        outs = [Outcome() for _ in reqs]
        task = asyncio.ensure_future(run_all(cluster.router, reqs, outs, concurrency=24))
        while sum(bool(o.finish) for o in outs) < 15:
            await asyncio.sleep(0.005)
        cluster.kill("prefill0")
        while sum(bool(o.finish) for o in outs) < 35:
            await asyncio.sleep(0.005)
        cluster.kill("redis")
        await asyncio.sleep(1.5)  # routers keep their last known workers; workers keep trying to heartbeat
        cluster.start_redis()
        await task
        return outs

    outs = asyncio.run(main())
    refs = {i: reference(tiny_llama, p, 40) for i, p in enumerate(ps)}
    for i, o in enumerate(outs):
        assert o.error is None, (i, o.error)
        assert o.tokens == refs[i % 20][: len(o.tokens)] and len(o.tokens) == reqs[i].parameters.max_new_tokens, i
    wait_known(cluster)  # the survivors registered again with the new Redis
    wait_idle(cluster.decode, cluster.prefill[1:])
    cluster.start("prefill0")
    wait_known(cluster)


# ---- chaos ------------------------------------------------------------------------------------------------
@pytest.mark.chaos
def test_chaos(cluster: Cluster, tiny_llama: LoadedModel) -> None:
    seed = int(os.environ.get("BATON_CHAOS_SEED", random.randrange(1 << 30)))
    n = int(os.environ.get("BATON_CHAOS_REQUESTS", "400"))
    concurrency = 32
    rng = random.Random(seed)
    ps = prompts(60, seed=seed)
    lengths = [32, 64, 96]
    reqs = [request(f"chaos-{i}", ps[i % 60], lengths[rng.randrange(3)]) for i in range(n)]
    refs = [reference(tiny_llama, p, max(lengths)) for p in ps]  # generate() alone
    # Each fault strikes once the given share of requests has completed: random moments, in a random order.
    at = {"decode0": rng.uniform(0.15, 0.5), "prefill0": rng.uniform(0.15, 0.6), "redis": rng.uniform(0.2, 0.7)}
    redis_down_s = rng.uniform(0.5, 3.0)
    faults: list[dict[str, Any]] = []

    async def main() -> list[Outcome]:
        outs = [Outcome() for _ in reqs]
        start = time.monotonic()
        task = asyncio.ensure_future(run_all(cluster.router, reqs, outs, concurrency=concurrency))
        pending = sorted(at.items(), key=lambda kv: kv[1])
        restart_at: float | None = None
        while not task.done():
            done = sum(bool(o.finish or o.error) for o in outs)
            while pending and done >= pending[0][1] * n:
                name, _ = pending.pop(0)
                streaming = sum(bool(o.tokens) and not o.finish for o in outs)
                cluster.kill(name)
                faults.append({"kill": name, "at_s": round(time.monotonic() - start, 2), "completed": done,
                               "streaming": streaming})
                if name == "redis":
                    restart_at = time.monotonic() + redis_down_s
            if restart_at is not None and time.monotonic() >= restart_at:
                cluster.start_redis()
                faults.append({"restart": "redis", "at_s": round(time.monotonic() - start, 2),
                               "down_s": round(redis_down_s, 2)})
                restart_at = None
            await asyncio.sleep(0.005)
        if restart_at is not None:
            cluster.start_redis()
            faults.append({"restart": "redis", "at_s": round(time.monotonic() - start, 2), "late": True})
        await task
        faults.append({"duration_s": round(time.monotonic() - start, 2)})
        return outs

    outs = asyncio.run(main())
    identical = [o.error is None and o.tokens == refs[i % 60][: len(o.tokens)]
                 and o.usage == (len(ps[i % 60]), reqs[i].parameters.max_new_tokens)
                 for i, o in enumerate(outs)]
    router_log = (cluster.logs / "router.log").read_text(errors="replace")
    resumed = re.findall(r"request chaos-\S+: .*; resuming after (\d+) tokens", router_log)
    report = {
        "seed": seed, "requests": n, "concurrency": concurrency, "faults": faults,
        "completed": sum(o.error is None and o.finish == pb.FINISH_REASON_LENGTH for o in outs),
        "failed": sum(o.error is not None for o in outs), "identical": sum(identical),
        "resumed": len(resumed), "resumed_tokens": sum(int(k) for k in resumed),
        "restarted": len(re.findall(r"request chaos-\S+: .*; starting again", router_log)),
        "prefill_retried": sum(r.startswith("prefill worker") for rs in recoveries(cluster, "chaos-") for r in rs),
        "requests_recovered": len(recoveries(cluster, "chaos-")),
    }
    print(json.dumps(report))
    if os.environ.get("BATON_CHAOS_OUT"):
        Path(os.environ["BATON_CHAOS_OUT"]).write_text(json.dumps(report, indent=1) + "\n")
    assert report["failed"] == 0, [o.error for o in outs if o.error][:5]
    assert all(identical), [i for i, ok in enumerate(identical) if not ok][:10]
    wait_known(cluster)
    wait_idle([cluster.address(w) for w in cluster.workers if w.startswith("decode") and cluster.alive(w)],
              [cluster.address(w) for w in cluster.workers if w.startswith("prefill") and cluster.alive(w)])
