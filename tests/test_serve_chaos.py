"""Nothing lost through `baton serve`, the command users run: with 2 decode and 2 prefill workers under 24
concurrent greedy streams (gRPC and the `openai` client over HTTP), a decode worker SIGKILLed mid-stream, then a
prefill worker, then the router; and, with a registry, Redis killed and started again. Every request completes
with exactly the tokens (and text) `generate()` gives alone: the router resumes what a dead worker held, and a
client whose stream the dead router held tries again. `baton serve` starts each killed service again, which then
serves, and afterwards no worker holds a row, a reservation or KV.

The numbers of each run go to docs/reliability.md ("Through baton serve"); BATON_CHAOS_OUT appends them to a
JSON-lines file.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from baton.engine.models import LoadedModel
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from tests.support.cluster import check_exact, load, prompts
from tests.support.oracle import reference
from tests.support.processes import free_port, occupancy, wait_idle, worker_channel
from tests.support.serve import Serve, baton_serve

pytestmark = pytest.mark.chaos

STREAMS = 24  # half over gRPC, half through the openai client
NEW_TOKENS = 160


@pytest.fixture(scope="module")
def serve(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    logs = tmp_path_factory.mktemp("serve-chaos")
    # every prompt through the prefill workers (on a CPU baton serve prefills short ones on the decode workers,
    # and the prefill workers would get nothing to lose); the Redis test below runs with that default
    with baton_serve(tiny_llama_dir, logs, "--decode-workers", "2", "--prefill-workers", "2",
                     "--local-prefill-tokens", "0") as s:
        yield s


def record(**numbers: Any) -> None:
    out = os.environ.get("BATON_CHAOS_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(numbers) + "\n")


def recovered_from(serve: Serve, role: str) -> int:
    """Requests the router recovered after a failure of a `role` worker, from its request log."""
    return sum(f"{role} worker" in line for line in serve.text().splitlines() if '"recoveries": [' in line)


def serves_again(serve: Serve, name: str, lm: LoadedModel) -> None:
    """The restarted service takes work: more requests until it has completed some (decode) or prefilled some."""
    address = serve.addresses()[name]
    role = "decode" if name.startswith("decode") else "prefill"
    more = prompts(8, seed=99)
    deadline = time.monotonic() + 60
    while True:
        outs = asyncio.run(load(serve.http, serve.grpc, NEW_TOKENS, more, lambda: None, 0))
        check_exact(outs, more, lm, NEW_TOKENS)
        done = occupancy(address, role).completed
        if done > 0:
            return
        assert time.monotonic() < deadline, f"{name} was started again but takes no work"


def idle(serve: Serve) -> None:
    wait_idle(serve.decode(), serve.prefill())
    for address in serve.decode():
        with worker_channel(address) as ch:
            occ = baton_pb2_grpc.DecodeWorkerStub(ch).Occupancy(pb.OccupancyRequest(), timeout=5)
        assert occ.active_rows == 0 and occ.kv_tokens_used == 0


@pytest.mark.parametrize("name", ["decode-0", "prefill-1"])
def test_a_killed_worker_loses_nothing_and_comes_back(serve: Serve, name: str, tiny_llama: LoadedModel) -> None:
    role = name.split("-")[0]
    killed: list[int] = []
    before = recovered_from(serve, role)
    if role == "decode":  # killed once the streams are well under way
        ids = prompts(STREAMS, seed=7)
        trigger: dict[str, Any] = {"at_tokens": STREAMS * NEW_TOKENS // 5}
    else:  # long prompts, killed while it holds some of them
        g = random.Random(8)
        ids = [[g.randrange(3, 2000) for _ in range(g.randrange(300, 800))] for _ in range(STREAMS)]
        address = serve.addresses()[name]
        trigger = {"at_tokens": 0, "when": lambda: occupancy(address, "prefill").waiting > 0}
    started = time.monotonic()
    outs = asyncio.run(load(serve.http, serve.grpc, NEW_TOKENS, ids, lambda: killed.append(serve.kill(name)),
                            **trigger))
    seconds = time.monotonic() - started
    assert killed, "the fault was not injected"
    check_exact(outs, ids, tiny_llama, NEW_TOKENS)
    recovered = recovered_from(serve, role) - before
    assert recovered > 0, f"no request was on {name} when it was killed"
    serve.wait_back(name, killed[0])
    assert f"{name} (pid {killed[0]}) exited with signal SIGKILL" in serve.text()
    serves_again(serve, name, tiny_llama)
    idle(serve)
    record(test="serve", fault=name, streams=STREAMS, completed=sum(o.error is None for o in outs),
           recovered=recovered, exact=True, seconds=round(seconds, 1))


def test_a_killed_router_is_started_again_and_clients_retry(serve: Serve, tiny_llama: LoadedModel) -> None:
    ids = prompts(STREAMS, seed=9)
    killed: list[int] = []
    retried: list[int] = []
    outs = asyncio.run(load(serve.http, serve.grpc, NEW_TOKENS, ids, lambda: killed.append(serve.kill("router")),
                            STREAMS * NEW_TOKENS // 5, retry_until_s=120, retried=retried))
    assert killed and retried  # the streams it held broke
    check_exact(outs, ids, tiny_llama, NEW_TOKENS)  # every client got its whole answer, some on a second try
    serve.wait_back("router", killed[0])
    idle(serve)  # what the dead router held was cancelled on the workers
    record(test="serve", fault="router", streams=STREAMS, completed=sum(o.error is None for o in outs),
           retried_by_clients=len(set(retried)), exact=True)


def test_a_conversation_goes_on_exactly_when_its_decode_worker_restarts_between_turns(
    serve: Serve, tiny_llama: LoadedModel
) -> None:
    """Through `baton serve` (every prompt through a prefill worker, the caches on as by default): a conversation's
    next turn is pushed less the blocks its decode worker holds; that worker is SIGKILLed between two turns and
    started again with an empty cache, and the next turns, which the router may still believe held there (such a
    push is refused and the whole KV goes), equal generate() on the whole conversation."""

    def held_bytes() -> float:
        total = 0.0
        for name in (n for n in serve.addresses() if n.startswith("decode")):
            text = httpx.get(serve.metrics_url(name), timeout=10).text
            total += sum(float(line.split()[-1]) for line in text.splitlines()
                         if line.startswith("baton_decode_kv_held_bytes_total"))
        return total

    with grpc.insecure_channel(serve.grpc) as ch:
        stub = baton_pb2_grpc.RouterStub(ch)

        def turn(ids: list[int]) -> list[int]:
            out = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), parameters=pb.SamplingParameters(
                max_new_tokens=8, ignore_eos=True)), timeout=120)
            assert list(out.token_ids) == reference(tiny_llama, ids, 8)
            time.sleep(1.0)  # the decode workers' next reports tell the router what their caches now hold
            return ids + list(out.token_ids)

        names = [n for n in serve.addresses() if n.startswith("decode")]
        before = {n: occupancy(serve.addresses()[n], "decode").completed for n in names}
        history = turn([50 + i % 11 for i in range(40)])
        holder = next(n for n in names if occupancy(serve.addresses()[n], "decode").completed > before[n])
        held = held_bytes()
        history = turn(history + [5, 6, 7])
        assert held_bytes() > held, "the second turn's KV was shipped whole"
        serve.wait_back(holder, serve.kill(holder))
        history = turn(history + [8, 9])
        turn(history + [10, 11])
    idle(serve)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_restarted_mid_stream_costs_nothing(tiny_llama_dir: Path, tiny_llama: LoadedModel,
                                                  tmp_path: Path) -> None:
    port = free_port()

    def start_redis() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return proc
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    redis = [start_redis()]

    def restart() -> None:
        redis[0].kill()
        redis[0].wait()
        time.sleep(random.uniform(0.5, 2.0))
        redis[0] = start_redis()

    try:
        with baton_serve(tiny_llama_dir, tmp_path, "--decode-workers", "2", "--prefill-workers", "2",
                         "--redis", f"redis://127.0.0.1:{port}/0") as serve:
            ids = prompts(STREAMS, seed=10)
            outs = asyncio.run(load(serve.http, serve.grpc, NEW_TOKENS, ids, restart, STREAMS * NEW_TOKENS // 4))
            check_exact(outs, ids, tiny_llama, NEW_TOKENS)
            killed = serve.kill("decode-1")  # and a worker, with the registry back
            serve.wait_back("decode-1", killed)
            more = prompts(8, seed=11)
            check_exact(asyncio.run(load(serve.http, serve.grpc, NEW_TOKENS, more, lambda: None, 0)), more, tiny_llama,
                        NEW_TOKENS)
            idle(serve)
            record(test="serve", fault="redis", streams=STREAMS, completed=sum(o.error is None for o in outs),
                   exact=True)
    finally:
        redis[0].send_signal(signal.SIGTERM)
        redis[0].wait()
