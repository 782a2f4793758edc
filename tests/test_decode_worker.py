"""The decode worker: first its transport-free core (no sockets), then the real `baton decode` process over gRPC."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from baton.engine.kv_payload import KVPayload
from baton.engine.models import LoadedModel
from baton.engine.prefix_cache import BLOCK_TOKENS
from baton.engine.request import FinishReason, Request, SamplingParams
from baton.engine.runner import ModelRunner
from baton.errors import (
    InvalidRequestError,
    NotFound,
    Overloaded,
    PayloadError,
    PrefixEvicted,
    ServiceError,
    Unavailable,
)
from baton.rpc.convert import params_to_proto
from baton.rpc.kv_transfer import payload_messages
from baton.serve import free_port
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.decode.worker import DecodeWorker, Reservation
from tests.conftest import make_tiny_llama
from tests.support.oracle import reference, until
from tests.support.processes import worker_channel

ROOT = Path(__file__).resolve().parents[1]



def prompt(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(3, 2000, (n,), generator=g).tolist())


def make(rid: str, ids: list[int], max_new: int = 8, **kw: object) -> Request:
    return Request(rid, list(ids), SamplingParams(max_new_tokens=max_new, ignore_eos=True, **kw))  # type: ignore[arg-type]


def kv_for(lm: LoadedModel, req: Request) -> KVPayload:
    return ModelRunner(lm).prefill(Request(req.id, list(req.prompt_ids), req.params))


async def collect(res: Reservation) -> tuple[list[int], FinishReason | None]:
    tokens: list[int] = []
    async for ev in res.events():
        tokens += ev.token_ids
        if ev.finish_reason is not None:
            return tokens, ev.finish_reason
    return tokens, None



def run_with_worker(lm: LoadedModel, body: Callable[[DecodeWorker], Awaitable[None]], **kw: object) -> None:
    async def main() -> None:
        worker = DecodeWorker(lm, **kw)  # type: ignore[arg-type]
        worker.start()
        try:
            await asyncio.wait_for(body(worker), 60)
        finally:
            await worker.close()

    asyncio.run(main())


def assert_empty(worker: DecodeWorker) -> None:
    occ = worker.occupancy()
    assert (occ.active_rows, occ.waiting, occ.kv_tokens_used) == (0, 0, 0)
    assert (occ.free_rows, occ.kv_tokens_free) == (worker.max_batch, worker.max_kv_tokens)


async def all_equal_generate(worker: DecodeWorker, lm: LoadedModel, reqs: dict[str, Request],
                             tasks: dict[str, asyncio.Task[tuple[list[int], FinishReason | None]]]) -> None:
    """Every request ran to its length, equal to generate() alone; then the worker holds nothing."""
    for rid, task in tasks.items():
        tokens, reason = await task
        assert tokens == reference(lm, reqs[rid].prompt_ids, len(tokens)), rid
        assert (len(tokens), reason) == (reqs[rid].params.max_new_tokens, FinishReason.LENGTH)
    await until(lambda: worker.occupancy().kv_tokens_used == 0)
    assert_empty(worker)


# ---- the core, no sockets --------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["baton", "orca", "padded"])
def test_staggered_requests_equal_generate(tiny_llama: LoadedModel, policy: str) -> None:
    """Requests reserved and fed KV at different times, while others run, each equal generate() alone."""
    specs = [("a", prompt(1, 5), 12), ("b", prompt(2, 23), 6), ("c", prompt(3, 1), 9), ("d", prompt(4, 40), 7)]
    reqs = {rid: make(rid, ids, n) for rid, ids, n in specs}
    payloads = {rid: kv_for(tiny_llama, r) for rid, r in reqs.items()}

    async def body(worker: DecodeWorker) -> None:
        tasks: dict[str, asyncio.Task[tuple[list[int], FinishReason | None]]] = {}

        def reserve(rid: str) -> None:
            tasks[rid] = asyncio.create_task(collect(worker.reserve(reqs[rid], 10.0)))

        reserve("a")
        reserve("b")
        occ = worker.occupancy()
        assert (occ.active_rows, occ.waiting, occ.free_rows) == (2, 2, 2)
        assert occ.kv_tokens_free == worker.max_kv_tokens - (5 + 12) - (23 + 6)
        worker.deliver_kv(payloads["a"])
        await until(lambda: worker.occupancy().waiting == 1)  # a is running
        worker.deliver_kv(payloads["b"])
        reserve("c")
        await until(lambda: worker.occupancy().waiting == 1)  # b is running, c waits for its KV
        reserve("d")
        worker.deliver_kv(payloads["d"])
        worker.deliver_kv(payloads["c"])
        assert worker.occupancy().kv_received == 4
        await all_equal_generate(worker, tiny_llama, reqs, tasks)
        occ = worker.occupancy()
        assert (occ.completed, occ.tokens_generated) == (4, sum(n for _, _, n in specs))

    run_with_worker(tiny_llama, body, policy=policy, max_batch=4)


@pytest.mark.parametrize("policy", ["baton", "orca"])
def test_prefilled_here_and_pushed_kv_share_the_batch(tiny_llama: LoadedModel, policy: str) -> None:
    """Requests reserved with prefill_here (no KV ever comes, no lease to expire) and requests whose KV is
    pushed, joining while others run: each equals generate() alone, and only the latter count as received KV."""
    specs = [("a", prompt(21, 7), 12, False), ("b", prompt(22, 19), 9, True), ("c", prompt(23, 3), 6, True),
             ("d", prompt(24, 33), 5, False)]
    reqs = {rid: make(rid, ids, n) for rid, ids, n, _ in specs}

    async def body(worker: DecodeWorker) -> None:
        tasks: dict[str, asyncio.Task[tuple[list[int], FinishReason | None]]] = {}
        for rid, _, _, here in specs:
            tasks[rid] = asyncio.create_task(collect(worker.reserve(reqs[rid], 0.5, prefill_here=here)))
            if not here:
                worker.deliver_kv(kv_for(tiny_llama, reqs[rid]))
            await until(lambda: worker.occupancy().waiting == 0)  # it runs: the next one joins a running batch
        await asyncio.sleep(0.6)  # past the lease a reservation without KV would have had
        await all_equal_generate(worker, tiny_llama, reqs, tasks)
        assert worker.occupancy().kv_received == 2
        assert worker.metrics.value("baton_decode_local_prefills_total") == 2
        assert worker.metrics.value("baton_decode_local_prefill_tokens_total") == 19 + 3
        if policy == "baton":  # the local prompts ran inside the batch's iterations, not in passes of their own
            assert worker.engine.stats.prefill_s == 0.0

    run_with_worker(tiny_llama, body, policy=policy, max_batch=4)


def test_first_token_streams_when_the_kv_arrives(tiny_llama: LoadedModel) -> None:
    """Under baton the prefill's first token goes out at once, not after a splice and a step, and only once;
    a first token that could end the request (here max_new_tokens 1) waits for the engine to decide."""
    long, short = make("long", prompt(5, 9), 6), make("short", prompt(6, 9), 1)
    payloads = {r.id: kv_for(tiny_llama, r) for r in (long, short)}

    async def body(worker: DecodeWorker) -> None:
        res_long, res_short = worker.reserve(long, 10.0), worker.reserve(short, 10.0)
        worker.deliver_kv(payloads["long"])
        worker.deliver_kv(payloads["short"])
        # no await yet: nothing from the decode loop can have reached the event loop
        assert res_long._events.qsize() == 1 and res_short._events.qsize() == 0
        assert (await collect(res_long)) == (reference(tiny_llama, long.prompt_ids, 6), FinishReason.LENGTH)
        assert (await collect(res_short)) == ([payloads["short"].first_token], FinishReason.LENGTH)
        await until(lambda: worker.occupancy().active_rows == 0)
        assert_empty(worker)

    run_with_worker(tiny_llama, body)


def test_cancel_frees_the_row_wherever_the_request_is(tiny_llama: LoadedModel) -> None:
    running, reserved = make("run", prompt(5, 10), 800), make("res", prompt(6, 4))
    payload = kv_for(tiny_llama, running)

    async def body(worker: DecodeWorker) -> None:
        res = worker.reserve(running)
        task = asyncio.create_task(collect(res))
        worker.deliver_kv(payload)
        await until(lambda: worker.occupancy().waiting == 0 and worker.occupancy().kv_tokens_used > 12)
        assert worker.cancel("run") and not worker.cancel("run")
        tokens, reason = await task
        assert reason is FinishReason.CANCELLED and len(tokens) < 800
        await until(lambda: len(worker.engine.batch) == 0 and worker.occupancy().kv_tokens_used == 0)

        held = worker.reserve(reserved)
        assert worker.occupancy().active_rows == 1
        assert held.cancel()
        assert await collect(held) == ([], FinishReason.CANCELLED)
        with pytest.raises(NotFound):
            worker.deliver_kv(kv_for(tiny_llama, reserved))
        assert_empty(worker)
        assert worker.occupancy().completed == 0

    run_with_worker(tiny_llama, body, max_batch=2)


def test_a_failed_step_ends_every_request_it_held_with_an_error_and_the_worker_serves_on(
        tiny_llama: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that fails while a prompt prefilled here is out of the waiting queue and not yet in the batch (the
    splice raising) still ends that request, and the running one, with an error naming the failure; none is left
    waiting forever, and the next request is served exactly."""
    running, newcomer, after = make("run", prompt(7, 9), 400), make("new", prompt(8, 5)), make("after", prompt(9, 6))

    async def body(worker: DecodeWorker) -> None:
        first = asyncio.create_task(collect(worker.reserve(running, prefill_here=True)))
        await until(lambda: len(worker.engine.batch) == 1)
        splice = worker.engine.batch.concatenate

        def broken(*args: object, **kwargs: object) -> object:
            raise RuntimeError("slab pool broken")

        monkeypatch.setattr(worker.engine.batch, "concatenate", broken)
        second = asyncio.create_task(collect(worker.reserve(newcomer, prefill_here=True)))
        for task in (first, second):
            with pytest.raises(ServiceError, match="decode step failed: RuntimeError: slab pool broken"):
                await task
        monkeypatch.setattr(worker.engine.batch, "concatenate", splice)
        assert await collect(worker.reserve(after, prefill_here=True)) == (
            reference(tiny_llama, after.prompt_ids, 8), FinishReason.LENGTH)
        assert_empty(worker)

    run_with_worker(tiny_llama, body, max_batch=2)


def test_lease_expires_without_kv(tiny_llama: LoadedModel) -> None:
    req = make("late", prompt(7, 6))

    async def body(worker: DecodeWorker) -> None:
        res = worker.reserve(req, kv_timeout_s=0.2)
        with pytest.raises(TimeoutError, match="no KV arrived"):
            await collect(res)
        assert_empty(worker)
        with pytest.raises(NotFound):
            worker.deliver_kv(kv_for(tiny_llama, req))

    run_with_worker(tiny_llama, body)


def test_kv_it_cannot_use_is_refused_and_the_reservation_stays(tiny_llama: LoadedModel) -> None:
    req = make("f", prompt(8, 6), 5)
    foreign = kv_for(make_tiny_llama(seed=1), req)
    other_prompt = kv_for(tiny_llama, make("f", prompt(9, 6)))

    async def body(worker: DecodeWorker) -> None:
        res = worker.reserve(req)
        with pytest.raises(PayloadError, match="model"):
            worker.deliver_kv(foreign)
        with pytest.raises(PayloadError, match="different prompt"):
            worker.deliver_kv(other_prompt)
        assert worker.occupancy().kv_received == 0
        worker.deliver_kv(kv_for(tiny_llama, req))
        with pytest.raises(PayloadError, match="already received"):
            worker.deliver_kv(kv_for(tiny_llama, req))
        tokens, reason = await collect(res)
        assert tokens == reference(tiny_llama, req.prompt_ids, 5) and reason is FinishReason.LENGTH

    run_with_worker(tiny_llama, body)


def test_a_push_leaving_out_held_blocks_is_completed_from_the_cache_or_refused(tiny_llama: LoadedModel) -> None:
    """A conversation's next turn pushed less the blocks this worker's prefix cache holds (its history, kept when
    the last turn finished) decodes as generate() on the whole prompt; a push leaving out blocks the cache does
    not hold is refused with PrefixEvicted, nothing spliced, and the reservation takes the whole KV after."""
    first = make("t1", prompt(20, 40), 6)
    per_token = tiny_llama.spec.num_layers * 2 * tiny_llama.spec.kv_heads * tiny_llama.spec.head_dim * 4

    async def body(worker: DecodeWorker) -> None:
        res = worker.reserve(first)
        worker.deliver_kv(kv_for(tiny_llama, first))
        history = first.prompt_ids + (await collect(res))[0]  # 46 tokens: the finished row kept 2 whole blocks
        second = make("t2", history + [7, 8, 9], 5)
        res = worker.reserve(second)
        worker.deliver_kv(kv_for(tiny_llama, second).leave_out(2 * BLOCK_TOKENS))
        tokens, _ = await collect(res)
        assert tokens == reference(tiny_llama, second.prompt_ids, 5)
        assert worker.metrics.kv_held_bytes._value.get() == 2 * BLOCK_TOKENS * per_token

        stranger = make("t3", prompt(21, 40), 5)  # nothing of it is cached
        res = worker.reserve(stranger)
        whole = kv_for(tiny_llama, stranger)
        with pytest.raises(PrefixEvicted, match="prefix cache"):
            worker.deliver_kv(whole.leave_out(BLOCK_TOKENS))
        worker.deliver_kv(whole)
        tokens, _ = await collect(res)
        assert tokens == reference(tiny_llama, stranger.prompt_ids, 5)
        assert worker.metrics.kv_held_evicted._value.get() == 1

    run_with_worker(tiny_llama, body, prefix_cache_bytes=10**8)


def test_admission_limits(tiny_llama: LoadedModel) -> None:
    async def body(worker: DecodeWorker) -> None:
        a = worker.reserve(make("a", [5, 6, 7], 10))  # 13 of 40 KV tokens
        with pytest.raises(InvalidRequestError, match="already live"):
            worker.reserve(make("a", [5], 1))
        with pytest.raises(InvalidRequestError, match="KV budget"):
            worker.reserve(make("huge", [5] * 30, 20))
        with pytest.raises(Overloaded, match="KV budget"):
            worker.reserve(make("big", [5] * 20, 10))  # 30 > 27 free
        with pytest.raises(InvalidRequestError, match="context"):
            worker.reserve(make("long", [5] * 10, 1020))
        b = worker.reserve(make("b", [5], 2))
        with pytest.raises(Overloaded, match="rows"):
            worker.reserve(make("c", [5], 2))
        a.cancel()
        b.cancel()
        assert_empty(worker)

    run_with_worker(tiny_llama, body, max_batch=2, max_kv_tokens=40)


def test_drain_finishes_running_requests_and_refuses_new_ones(tiny_llama: LoadedModel) -> None:
    req = make("d", prompt(10, 8), 20)
    payload = kv_for(tiny_llama, req)

    async def body(worker: DecodeWorker) -> None:
        task = asyncio.create_task(collect(worker.reserve(req)))
        worker.deliver_kv(payload)
        drained = asyncio.create_task(worker.drain())
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="draining"):
            worker.reserve(make("late", [5, 6]))
        await drained
        assert task.done() and task.result() == (reference(tiny_llama, req.prompt_ids, 20), FinishReason.LENGTH)

    run_with_worker(tiny_llama, body)


# ---- the `baton decode` process over gRPC ---------------------------------------------------------------




def start_decode(model_dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "baton.cli", "decode", "--model", str(model_dir), "--device", "cpu",
           "--threads", "1", "--host", "127.0.0.1", "--port", str(port), *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 90
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"baton decode exited with {proc.returncode}"
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service="baton.v1.DecodeWorker"), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("baton decode did not become SERVING")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def decode_address(tiny_llama_dir: Path) -> Iterator[str]:
    port = free_port()
    proc = start_decode(tiny_llama_dir, port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.fixture
def stub(decode_address: str) -> Iterator[baton_pb2_grpc.DecodeWorkerStub]:
    with worker_channel(decode_address) as ch:
        yield baton_pb2_grpc.DecodeWorkerStub(ch)


def decode_request(req: Request, kv_timeout_s: float = 20.0) -> pb.DecodeRequest:
    wr = pb.WorkerRequest(request_id=req.id, prompt_ids=req.prompt_ids, parameters=params_to_proto(req.params))
    return pb.DecodeRequest(request=wr, kv_timeout_seconds=kv_timeout_s)


def read_all(call: Iterator[pb.DecodeResponse]) -> tuple[list[int], int]:
    tokens: list[int] = []
    for msg in call:
        tokens += msg.token_ids
        if msg.finish_reason:
            return tokens, msg.finish_reason
    raise AssertionError("stream ended without a finish reason")


def wait_empty(stub: baton_pb2_grpc.DecodeWorkerStub) -> pb.OccupancyResponse:
    deadline = time.monotonic() + 20
    while True:
        occ = stub.Occupancy(pb.OccupancyRequest(), timeout=5)
        if (occ.active_rows, occ.waiting, occ.kv_tokens_used) == (0, 0, 0):
            return occ
        assert time.monotonic() < deadline, f"worker not empty: {occ}"
        time.sleep(0.05)


def test_grpc_decode_equals_generate(stub: baton_pb2_grpc.DecodeWorkerStub, tiny_llama: LoadedModel) -> None:
    reqs = [make("g1", prompt(11, 7), 10), make("g2", prompt(12, 30), 6)]
    calls = [stub.Decode(decode_request(r)) for r in reqs]
    for call in calls:
        first = next(call)
        assert not first.token_ids and not first.finish_reason
    occ = stub.Occupancy(pb.OccupancyRequest())
    assert (occ.active_rows, occ.waiting) == (2, 2) and occ.model_fingerprint == tiny_llama.fingerprint
    for r in reqs:
        payload = kv_for(tiny_llama, r)
        assert stub.PushKv(payload_messages(payload, chunk_bytes=1000)).received_bytes == payload.nbytes
    for r, call in zip(reqs, calls):
        assert read_all(call) == (reference(tiny_llama, r.prompt_ids, r.params.max_new_tokens), pb.FINISH_REASON_LENGTH)
    occ = wait_empty(stub)
    assert occ.completed >= 2 and occ.kv_received >= 2 and occ.free_rows == 32


def test_grpc_stop_string_ends_the_stream_with_its_text(
    stub: baton_pb2_grpc.DecodeWorkerStub, tiny_llama: LoadedModel
) -> None:
    ids = prompt(16, 5)
    tok = tiny_llama.tokenizer
    assert tok is not None
    full = reference(tiny_llama, ids, 12)
    text = tok.decode(full, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip()
    req = make("stop", ids, 12, stop=(stop,))
    call = stub.Decode(decode_request(req))
    next(call)
    stub.PushKv(payload_messages(kv_for(tiny_llama, req)))
    msgs = list(call)
    tokens = [t for m in msgs for t in m.token_ids]
    last = msgs[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP and last.HasField("stop_text")
    assert tokens == full[: len(tokens)]
    got = tok.decode(tokens, skip_special_tokens=True)
    assert stop in got and stop not in tok.decode(tokens[:-1], skip_special_tokens=True)
    assert last.stop_text == got[: got.find(stop)]


def test_grpc_health_and_reflection(decode_address: str) -> None:
    with worker_channel(decode_address) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answer = next(iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
        names = {s.name for s in answer.list_services_response.service}
        assert {"baton.v1.DecodeWorker", "grpc.health.v1.Health"} <= names


def test_grpc_damaged_pushes_are_refused(stub: baton_pb2_grpc.DecodeWorkerStub, tiny_llama: LoadedModel) -> None:
    req = make("dmg", prompt(13, 9), 5)
    payload = kv_for(tiny_llama, req)
    call = stub.Decode(decode_request(req))
    next(call)
    msgs = list(payload_messages(payload, chunk_bytes=500))
    assert len(msgs) > 3
    bad = pb.PushKvRequest()
    bad.CopyFrom(msgs[2])
    bad.chunk.data = bytes([bad.chunk.data[0] ^ 0xFF]) + bad.chunk.data[1:]
    for damaged, what in (([*msgs[:2], bad, *msgs[3:]], "checksum"), (msgs[:-1], "truncated")):
        with pytest.raises(grpc.RpcError) as e:
            stub.PushKv(iter(damaged))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in str(e.value.details())
    with pytest.raises(grpc.RpcError) as e:
        stub.PushKv(payload_messages(kv_for(tiny_llama, make("nobody", [5, 6]))))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    stub.PushKv(iter(msgs))  # the reservation survived the damaged pushes
    assert read_all(call) == (reference(tiny_llama, req.prompt_ids, 5), pb.FINISH_REASON_LENGTH)


def test_grpc_cancelling_the_call_frees_the_row(stub: baton_pb2_grpc.DecodeWorkerStub, tiny_llama: LoadedModel) -> None:
    running = make("cx", prompt(14, 12), 900)
    call = stub.Decode(decode_request(running))
    next(call)
    stub.PushKv(payload_messages(kv_for(tiny_llama, running)))
    assert next(call).token_ids
    call.cancel()
    wait_empty(stub)

    reserved = stub.Decode(decode_request(make("cy", [5, 6, 7])))
    next(reserved)
    assert stub.Occupancy(pb.OccupancyRequest()).active_rows == 1
    reserved.cancel()
    wait_empty(stub)

    third = stub.Decode(decode_request(make("cz", [5, 6, 7])))
    next(third)
    assert stub.Cancel(pb.CancelRequest(request_id="cz")).found
    assert read_all(third) == ([], pb.FINISH_REASON_CANCELLED)
    assert not stub.Cancel(pb.CancelRequest(request_id="cz")).found


def test_grpc_errors_name_the_problem(stub: baton_pb2_grpc.DecodeWorkerStub) -> None:
    late = stub.Decode(decode_request(make("late", [5, 6]), kv_timeout_s=0.3))
    next(late)
    with pytest.raises(grpc.RpcError) as e:
        read_all(late)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "no KV arrived" in str(e.value.details())
    bad = decode_request(make("bad", [5, 6]))
    bad.request.parameters.top_p = 2.0
    with pytest.raises(grpc.RpcError) as e:
        next(stub.Decode(bad))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in str(e.value.details())
    wait_empty(stub)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_sigterm_drains_and_deregisters(tiny_llama_dir: Path, tiny_llama: LoadedModel, tmp_path: Path) -> None:
    from baton.rpc.registry import RedisRegistry

    redis_port, port = free_port(), free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{redis_port}/0"

    def registered() -> list[str]:
        async def ask() -> list[str]:
            reg = RedisRegistry(url)
            try:
                return [w.address for w in await reg.workers("decode") if w.model_fingerprint == tiny_llama.fingerprint]
            finally:
                await reg.close()

        return asyncio.run(ask())

    proc = None
    try:
        proc = start_decode(tiny_llama_dir, port, "--redis", url, "--heartbeat-s", "0.2", "--advertise", "me:1")
        deadline = time.monotonic() + 10
        while registered() != ["me:1"]:
            assert time.monotonic() < deadline, "worker never registered"
            time.sleep(0.1)
        req = make("long", prompt(15, 6), 60)
        with worker_channel(f"127.0.0.1:{port}") as ch:
            stub = baton_pb2_grpc.DecodeWorkerStub(ch)
            call = stub.Decode(decode_request(req))
            next(call)
            stub.PushKv(payload_messages(kv_for(tiny_llama, req)))
            first = list(next(call).token_ids)
            proc.send_signal(signal.SIGTERM)
            rest, reason = read_all(call)
        assert (first + rest, reason) == (reference(tiny_llama, req.prompt_ids, 60), pb.FINISH_REASON_LENGTH)
        assert proc.wait(timeout=30) == 0
        assert registered() == []
    finally:
        if proc is not None:
            stop(proc)
        redis.kill()
        redis.wait(timeout=10)
