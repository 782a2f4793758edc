"""The prefill worker: its transport-free core, its servicer, and a real `baton prefill` process shipping KV to a
fake decode worker over gRPC."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.engine.kv_payload import KVPayload
from baton.engine.models import LoadedModel
from baton.engine.request import Request, SamplingParams
from baton.engine.runner import ModelRunner
from baton.errors import Cancelled, InvalidRequestError, Overloaded, Unavailable
from baton.rpc.convert import params_to_proto
from baton.rpc.kv_transfer import payload_from_messages
from baton.rpc.registry import RedisRegistry
from baton.rpc.server import Service, channel, create_server
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.prefill.server import PrefillWorkerServicer
from services.prefill.worker import PrefillWorker
from tests.support.processes import internal_token
from tests.test_registry import RedisServer, free_port

TOKEN = internal_token()  # the prefill processes here use the session's token file

REPO = Path(__file__).resolve().parent.parent
PROMPT = [1, 415, 2936, 9060, 285, 1048, 690, 260, 21614, 3593, 30, 1073, 4, 88, 901, 12]


class Gate:
    """Wraps a prefill function so the first call blocks until opened: holds the compute thread mid-batch."""

    def __init__(self, lm: LoadedModel) -> None:
        self.runner = ModelRunner(lm)
        self.started = threading.Event()
        self.open = threading.Event()
        self.calls: list[str] = []

    def __call__(self, reqs: list[Request]) -> list[KVPayload]:
        self.calls += [req.id for req in reqs]
        self.started.set()
        self.open.wait(30)
        return self.runner.prefill_many(reqs)

    async def wait_started(self) -> None:
        assert await asyncio.to_thread(self.started.wait, 30)


def request(rid: str, prompt: list[int] = PROMPT, **params: object) -> Request:
    return Request(rid, list(prompt), SamplingParams(**params))  # type: ignore[arg-type]


@pytest.fixture
def gated(tiny_llama: LoadedModel) -> Iterator[tuple[PrefillWorker, Gate]]:
    gate = Gate(tiny_llama)
    worker = PrefillWorker(tiny_llama, max_queue=8, prefill_fn=gate)
    try:
        yield worker, gate
    finally:
        gate.open.set()
        worker.shutdown()


# -- the core --------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_queue_batches_cancel_and_occupancy(gated: tuple[PrefillWorker, Gate], tiny_llama: LoadedModel) -> None:
    worker, gate = gated
    fa = worker.submit(request("a"))
    await gate.wait_started()  # "a" is being computed; the thread is held
    fb, fc, fd = (worker.submit(request(x, PROMPT[: 4 + i])) for i, x in enumerate("bcd"))
    occ = worker.occupancy()
    assert (occ.queued, occ.running, occ.waiting) == (3, 1, 4)
    assert worker.queued_ids == ["b", "c", "d"] and worker.running_ids == ["a"]

    assert worker.cancel("c")  # a queued request: dropped at once
    assert not worker.cancel("c") and not worker.cancel("nope")
    with pytest.raises(Cancelled):
        await fc
    assert worker.queued_ids == ["b", "d"]
    assert worker.occupancy().waiting == 3

    gate.open.set()
    ra, rb, rd = await asyncio.gather(fa, fb, fd)
    runner = ModelRunner(tiny_llama)
    for r, req in ((ra, request("a")), (rb, request("b", PROMPT[:4])), (rd, request("d", PROMPT[:6]))):
        want = runner.prefill(req)
        assert r.payload.request_id == req.id and r.payload.prompt_ids == req.prompt_ids
        torch.testing.assert_close(r.payload.kv, want.kv)  # b and d ran packed together: equal up to rounding
        assert r.payload.first_token == want.first_token
        assert r.payload.model_fingerprint == tiny_llama.fingerprint
    assert gate.calls == ["a", "b", "d"]  # "c" never computed
    batches = {le: worker.metrics.value("baton_prefill_batch_size_bucket", le=le) for le in ("1.0", "2.0", "+Inf")}
    assert batches["1.0"] < batches["2.0"] == batches["+Inf"]  # b and d were taken together: the largest was 2
    occ = worker.occupancy()
    assert (occ.waiting, occ.completed) == (0, 3)
    assert worker.metrics.value("baton_prefill_requests_total", outcome="cancelled") == 1


@pytest.mark.asyncio
async def test_cancel_during_compute_drops_the_result(gated: tuple[PrefillWorker, Gate]) -> None:
    worker, gate = gated
    fa = worker.submit(request("a"))
    await gate.wait_started()
    assert worker.cancel("a")
    gate.open.set()
    with pytest.raises(Cancelled):
        await fa
    rb = await worker.submit(request("b"))  # the id "a" is free again, the worker goes on
    assert rb.payload.request_id == "b"
    assert worker.occupancy().completed == 1 and worker.occupancy().waiting == 0
    await worker.submit(request("a"))


@pytest.mark.asyncio
async def test_cancelling_the_future_drops_a_queued_request(gated: tuple[PrefillWorker, Gate]) -> None:
    worker, gate = gated
    fa = worker.submit(request("a"))
    await gate.wait_started()
    fb = worker.submit(request("b"))
    fb.cancel()  # what happens when the awaiting RPC is cancelled
    await asyncio.sleep(0)
    assert worker.queued_ids == []
    gate.open.set()
    await fa
    assert gate.calls == ["a"] and worker.occupancy().waiting == 0


@pytest.mark.asyncio
async def test_submit_refuses(gated: tuple[PrefillWorker, Gate], tiny_llama: LoadedModel) -> None:
    worker, gate = gated
    with pytest.raises(InvalidRequestError) as e:
        worker.submit(request("long", [5] * 1000, max_new_tokens=100))  # context is 1024
    assert e.value.field == "max_new_tokens"
    with pytest.raises(InvalidRequestError) as e:
        worker.submit(request("vocab", [tiny_llama.config.vocab_size]))
    assert e.value.field == "prompt"
    futures = [worker.submit(request("a"))]
    await gate.wait_started()
    with pytest.raises(InvalidRequestError) as e:
        worker.submit(request("a"))
    assert e.value.field == "request_id"
    futures += [worker.submit(request(f"q{i}")) for i in range(worker.max_queue)]
    with pytest.raises(Overloaded):
        worker.submit(request("one-too-many"))
    worker.close_intake()
    with pytest.raises(Unavailable):
        worker.submit(request("late"))
    gate.open.set()
    await asyncio.wait_for(worker.drain(), 30)  # accepted work still completes
    assert all(f.done() and not f.cancelled() for f in futures)
    assert worker.occupancy().completed == 1 + worker.max_queue


@pytest.mark.asyncio
async def test_compute_error_reaches_the_submitter(tiny_llama: LoadedModel) -> None:
    def broken(reqs: list[Request]) -> list[KVPayload]:
        raise RuntimeError("out of memory, say")

    worker = PrefillWorker(tiny_llama, prefill_fn=broken)
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            await worker.submit(request("a"))
        assert worker.metrics.value("baton_prefill_requests_total", outcome="failed") == 1
        assert worker.occupancy().waiting == 0
    finally:
        worker.shutdown()


# -- the servicer, without sockets ------------------------------------------------------------------------


class FakeContext:
    """Just enough of grpc.aio.ServicerContext for direct servicer calls."""


@pytest.mark.asyncio
async def test_cancelled_rpc_drops_its_queued_prefill(gated: tuple[PrefillWorker, Gate]) -> None:
    worker, gate = gated
    servicer = PrefillWorkerServicer(worker)
    first = worker.submit(request("busy"))
    await gate.wait_started()
    msg = pb.PrefillRequest(
        request=pb.WorkerRequest(request_id="r1", prompt_ids=PROMPT, parameters=pb.SamplingParameters()),
        decode_address="127.0.0.1:1",
    )
    call = asyncio.create_task(servicer.Prefill(msg, FakeContext()))
    while worker.queued_ids != ["r1"]:
        await asyncio.sleep(0.01)
    assert worker.occupancy().waiting == 2
    call.cancel()  # what grpc does when the caller cancels
    with pytest.raises(asyncio.CancelledError):
        await call
    assert worker.queued_ids == []
    gate.open.set()
    await first
    assert gate.calls == ["busy"]
    await worker.shipper.close()


# -- a real `baton prefill` process and a fake decode worker ----------------------------------------------


class FakeDecode(baton_pb2_grpc.DecodeWorkerServicer):
    """Collects pushed payloads; can refuse them, or hold them until released."""

    def __init__(self) -> None:
        self.payloads: list[KVPayload] = []
        self.refuse: str | None = None
        self.hold: asyncio.Event | None = None
        self.pushing = asyncio.Event()

    async def PushKv(
        self, request_iterator: AsyncIterator[pb.PushKvRequest], context: grpc.aio.ServicerContext
    ) -> pb.PushKvResponse:
        payload = await payload_from_messages(request_iterator)
        self.pushing.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.refuse:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.refuse)
        self.payloads.append(payload)
        return pb.PushKvResponse(received_bytes=payload.nbytes)


FAKE_DECODE = f"127.0.0.1:{free_port()}"  # where each test's fake decode worker listens, in turn
NOBODY = f"127.0.0.1:{free_port()}"  # a decode worker the prefill process knows, where nothing listens


@pytest_asyncio.fixture
async def fake_decode() -> AsyncIterator[tuple[FakeDecode, str]]:
    fake = FakeDecode()
    address = FAKE_DECODE
    service = Service(fake, baton_pb2_grpc.add_DecodeWorkerServicer_to_server, "baton.v1.DecodeWorker")
    server, _ = create_server([service], address)
    await server.start()
    yield fake, address
    await server.stop(grace=None)


@pytest.mark.asyncio
async def test_cancel_rpc_stops_a_push(tiny_llama: LoadedModel, fake_decode: tuple[FakeDecode, str]) -> None:
    fake, decode_address = fake_decode
    fake.hold = asyncio.Event()
    worker = PrefillWorker(tiny_llama)
    servicer = PrefillWorkerServicer(worker)
    try:
        call = asyncio.create_task(servicer.Prefill(prefill_request("r1", decode_address), FakeContext()))
        await asyncio.wait_for(fake.pushing.wait(), 30)
        assert worker.in_flight == 1
        reply = await servicer.Cancel(pb.CancelRequest(request_id="r1"), FakeContext())
        assert reply.found
        with pytest.raises(Cancelled):
            await call
        shipped = worker.metrics.value("baton_prefill_kv_transfer_seconds_count")
        assert worker.in_flight == 0 and shipped == 0 and fake.payloads == []
    finally:
        fake.hold.set()
        await worker.close()


def start_prefill(model_dir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "baton.cli",
            "prefill",
            "--model",
            str(model_dir),
            "--threads",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ],
        cwd=REPO,
        env=env,
    )
    deadline = time.monotonic() + 90
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"baton prefill exited with {proc.returncode}")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service="baton.v1.PrefillWorker"), timeout=1)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("baton prefill did not become SERVING")
            time.sleep(0.2)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefill_address(tiny_llama_dir: Path) -> Iterator[str]:
    port = free_port()
    proc = start_prefill(tiny_llama_dir, port, "--decode", FAKE_DECODE, NOBODY)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)


def prefill_request(rid: str, decode_address: str, prompt: list[int] = PROMPT, **params: object) -> pb.PrefillRequest:
    return pb.PrefillRequest(
        request=pb.WorkerRequest(
            request_id=rid,
            prompt_ids=prompt,
            parameters=params_to_proto(SamplingParams(**params)),  # type: ignore[arg-type]
        ),
        decode_address=decode_address,
    )


@pytest.mark.asyncio
async def test_prefill_ships_kv_to_the_decode_worker(
    prefill_address: str, fake_decode: tuple[FakeDecode, str], tiny_llama: LoadedModel
) -> None:
    fake, decode_address = fake_decode
    async with channel(prefill_address, internal_token=TOKEN) as ch:
        stub = baton_pb2_grpc.PrefillWorkerStub(ch)
        resp = await stub.Prefill(prefill_request("p1", decode_address, max_new_tokens=8), timeout=60)
        sampled = await stub.Prefill(
            prefill_request("p2", decode_address, PROMPT[:7], temperature=0.8, seed=7), timeout=60
        )
        occ = await stub.Occupancy(pb.OccupancyRequest(), timeout=10)
        assert not (await stub.Cancel(pb.CancelRequest(request_id="p1"), timeout=10)).found
    assert [p.request_id for p in fake.payloads] == ["p1", "p2"]
    runner = ModelRunner(tiny_llama)
    for got, req in zip(
        fake.payloads, (request("p1", max_new_tokens=8), request("p2", PROMPT[:7], temperature=0.8, seed=7))
    ):
        want = runner.prefill(req)
        assert got.model_fingerprint == tiny_llama.fingerprint
        assert got.prompt_ids == req.prompt_ids and got.kv.shape == want.kv.shape and got.kv.dtype == want.kv.dtype
        # same weights; --threads 1 there vs this process's threads may differ in the last bit
        torch.testing.assert_close(got.kv, want.kv, rtol=1e-5, atol=1e-6)
        assert got.first_token == want.first_token
    assert resp.request_id == "p1" and resp.kv_bytes == fake.payloads[0].nbytes
    assert resp.prefill_seconds > 0 and resp.transfer_seconds > 0
    assert sampled.kv_bytes == fake.payloads[1].nbytes
    assert occ.waiting == 0 and occ.completed >= 2 and occ.model_fingerprint == tiny_llama.fingerprint


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("params", "field"),
    [
        (pb.SamplingParameters(temperature=-1.0), "temperature"),
        (pb.SamplingParameters(top_p=0.0), "top_p"),
        (pb.SamplingParameters(repetition_penalty=0.0), "repetition_penalty"),
        (pb.SamplingParameters(max_new_tokens=0), "max_new_tokens"),
        (pb.SamplingParameters(max_new_tokens=1020), "max_new_tokens"),  # prompt + this > context (1024)
        (pb.SamplingParameters(seed=2**63), "seed"),
    ],
)
async def test_invalid_requests_name_the_field(
    prefill_address: str, fake_decode: tuple[FakeDecode, str], params: pb.SamplingParameters, field: str
) -> None:
    fake, decode_address = fake_decode
    msg = pb.PrefillRequest(
        request=pb.WorkerRequest(request_id="bad", prompt_ids=PROMPT, parameters=params), decode_address=decode_address
    )
    async with channel(prefill_address, internal_token=TOKEN) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await baton_pb2_grpc.PrefillWorkerStub(ch).Prefill(msg, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (e.value.details() or "")
    assert fake.payloads == []


@pytest.mark.asyncio
async def test_missing_fields_are_invalid(prefill_address: str, fake_decode: tuple[FakeDecode, str]) -> None:
    _, decode_address = fake_decode
    cases = [
        (prefill_request("", decode_address), "request_id"),
        (prefill_request("x", ""), "decode_address"),
        (prefill_request("x", decode_address, []), "prompt"),
    ]
    async with channel(prefill_address, internal_token=TOKEN) as ch:
        stub = baton_pb2_grpc.PrefillWorkerStub(ch)
        for msg, field in cases:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Prefill(msg, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in (e.value.details() or "")


@pytest.mark.asyncio
async def test_push_errors_pass_through(prefill_address: str, fake_decode: tuple[FakeDecode, str]) -> None:
    fake, decode_address = fake_decode
    async with channel(prefill_address, internal_token=TOKEN) as ch:
        stub = baton_pb2_grpc.PrefillWorkerStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Prefill(prefill_request("lost", NOBODY), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        fake.refuse = "KV payload comes from model 0123, this worker serves 4567"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Prefill(prefill_request("refused", decode_address), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "this worker serves 4567" in (e.value.details() or "")
        occ = await stub.Occupancy(pb.OccupancyRequest(), timeout=10)
        assert occ.waiting == 0


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_registers_and_on_sigterm_finishes_in_flight_prefill_then_exits_0(tiny_llama_dir: Path, tmp_path: Path) -> None:
    redis = RedisServer(free_port(), tmp_path)
    redis.start()
    port = free_port()
    advertised = f"prefill-under-test:{port}"
    decode_address = f"127.0.0.1:{free_port()}"
    proc = start_prefill(tiny_llama_dir, port, "--redis", redis.url, "--heartbeat-s", "0.1", "--advertise", advertised,
                         "--decode", decode_address)

    async def scenario() -> pb.PrefillResponse:
        registry = RedisRegistry(redis.url)
        fake = FakeDecode()
        fake.hold = asyncio.Event()
        server, _ = create_server(
            [Service(fake, baton_pb2_grpc.add_DecodeWorkerServicer_to_server, "baton.v1.DecodeWorker")],
            decode_address,
        )
        await server.start()
        try:
            while not (workers := await registry.workers("prefill")):
                await asyncio.sleep(0.05)
            assert [(w.address, w.role) for w in workers] == [(advertised, "prefill")]
            assert await registry.workers("decode") == []
            async with channel(f"127.0.0.1:{port}", internal_token=TOKEN) as ch:
                call = asyncio.ensure_future(
                    baton_pb2_grpc.PrefillWorkerStub(ch).Prefill(
                        prefill_request("inflight", decode_address), timeout=60
                    )
                )
                await asyncio.wait_for(fake.pushing.wait(), 60)  # the KV push is under way
                proc.send_signal(signal.SIGTERM)
                while await registry.workers("prefill"):  # it leaves the registry at once
                    await asyncio.sleep(0.05)
                with pytest.raises(grpc.aio.AioRpcError) as e:  # and takes no new work
                    await baton_pb2_grpc.PrefillWorkerStub(ch).Prefill(
                        prefill_request("late", decode_address), timeout=10
                    )
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "shutting down" in (e.value.details() or "")
                fake.hold.set()
                return await call
        finally:
            await server.stop(grace=None)
            await registry.close()

    try:
        resp = asyncio.run(scenario())
        assert resp.request_id == "inflight" and resp.kv_bytes > 0
        assert proc.wait(timeout=30) == 0
    finally:
        stop_process(proc)
        redis.stop()
