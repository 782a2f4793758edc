"""The router: first its core and gRPC API in-process against fake workers (every path of a request, quickly),
then the real `baton router`, `baton decode` and `baton prefill` processes on the tiny model."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from transformers import PreTrainedTokenizerBase

from baton.engine.models import LoadedModel
from baton.engine.request import SamplingParams
from baton.rpc.load import Role
from baton.rpc.registry import RedisRegistry, WorkerInfo
from baton.rpc.server import Service, create_server
from baton.serve import free_port, wait_serving
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.router.core import Router, TextStream
from services.router.grpc_api import router_service
from services.router.pool import WorkerPool
from services.router.scheduler import Scheduler
from tests.conftest import TINY_SPEC
from tests.support.oracle import reference, until
from tests.support.processes import worker_channel

ROOT = Path(__file__).resolve().parents[1]
FINGERPRINT = "f" * 64


# ---- fake workers ------------------------------------------------------------------------------------------
@dataclass
class Script:
    """What a fake decode worker streams for a request: chunks of tokens, then how it ended."""

    chunks: list[list[int]]
    finish: int = pb.FINISH_REASON_LENGTH
    stop_text: str | None = None
    delay_s: float = 0.0  # between chunks


@dataclass
class FakeDecode(baton_pb2_grpc.DecodeWorkerServicer):
    free_rows: int = 4
    refuse: bool = False
    script: Callable[[pb.WorkerRequest], Script] = lambda r: Script([[t] for t in r.prompt_ids[:3]])
    requests: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    kv: dict[str, asyncio.Event] = field(default_factory=dict)

    def kv_event(self, request_id: str) -> asyncio.Event:
        return self.kv.setdefault(request_id, asyncio.Event())

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        rid = request.request.request_id
        if self.refuse:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")
        self.requests.append(rid)
        try:
            yield pb.DecodeResponse()
            await self.kv_event(rid).wait()
            script = self.script(request.request)
            for i, chunk in enumerate(script.chunks):
                await asyncio.sleep(script.delay_s)
                msg = pb.DecodeResponse(token_ids=chunk)
                if i == len(script.chunks) - 1:
                    msg.finish_reason = script.finish  # type: ignore[assignment]
                    if script.stop_text is not None:
                        msg.stop_text = script.stop_text
                yield msg
        except asyncio.CancelledError:
            self.cancelled.append(rid)
            raise

    async def Occupancy(self, request: pb.OccupancyRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        return pb.OccupancyResponse(free_rows=self.free_rows, kv_tokens_free=100_000, model_fingerprint=FINGERPRINT)


@dataclass
class FakePrefill(baton_pb2_grpc.PrefillWorkerServicer):
    decoders: dict[str, FakeDecode]
    delay_s: float = 0.0
    fail: bool = False
    requests: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        rid = request.request.request_id
        self.requests.append(rid)
        await asyncio.sleep(self.delay_s)
        if self.fail:
            await context.abort(grpc.StatusCode.INTERNAL, "prefill exploded")
        self.decoders[request.decode_address].kv_event(rid).set()
        return pb.PrefillResponse(request_id=rid)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        self.cancelled.append(request.request_id)
        return pb.CancelResponse(found=True)

    async def Occupancy(self, request: pb.OccupancyRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        return pb.OccupancyResponse(model_fingerprint=FINGERPRINT)


@dataclass
class Cluster:
    """A router (core and gRPC API) in this event loop, over fake workers, and a client stub."""

    router: Router
    stub: baton_pb2_grpc.RouterStub
    decoders: dict[str, FakeDecode]
    prefill: FakePrefill



@pytest_asyncio.fixture
async def cluster(tokenizer: PreTrainedTokenizerBase, request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    """Two fake decode workers and one fake prefill worker; `@pytest.mark.parametrize("cluster", [{...}],
    indirect=True)` sets Router options (max_queue, queue_timeout_s)."""
    opts = dict(getattr(request, "param", {}))
    decoders = {f"127.0.0.1:{free_port()}": FakeDecode() for _ in range(2)}
    prefill = FakePrefill(decoders)
    prefill_address = f"127.0.0.1:{free_port()}"
    servers = []
    for address, fake in decoders.items():
        servers.append(create_server([Service(fake, baton_pb2_grpc.add_DecodeWorkerServicer_to_server, "d")],
                                     address)[0])
    servers.append(create_server([Service(prefill, baton_pb2_grpc.add_PrefillWorkerServicer_to_server, "p")],
                                 prefill_address)[0])
    pool = WorkerPool(Scheduler(max_queue=opts.pop("max_queue", 8)), list(decoders), [prefill_address], poll_s=0.05)
    router = Router(tokenizer, "tiny", TINY_SPEC, pool, **opts)
    router_address = f"127.0.0.1:{free_port()}"
    router_server, _ = create_server([router_service(router)], router_address)
    servers.append(router_server)
    for s in servers:
        await s.start()
    await router.start()
    channel = grpc.aio.insecure_channel(router_address)
    try:
        yield Cluster(router, baton_pb2_grpc.RouterStub(channel), decoders, prefill)
    finally:
        await channel.close()
        await router.close()
        for s in servers:
            await s.stop(None)


def generate_request(prompt: str | list[int], rid: str = "", **params: object) -> pb.GenerateRequest:
    req = pb.GenerateRequest(request_id=rid, parameters=pb.SamplingParameters(**params))  # type: ignore[arg-type]
    if isinstance(prompt, str):
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt)
    return req


# ---- incremental text ------------------------------------------------------------------------------------
def test_text_stream_holds_back_incomplete_characters_and_stop_prefixes(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer.encode("Hi 🙂 there, and ünïcödé!")
    stream = TextStream(tokenizer)
    deltas = [stream.add([t]) for t in ids] + [stream.finish(None)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids)

    ids = tokenizer.encode("one two three four")
    stream = TextStream(tokenizer, stop=(" three",))
    deltas = [stream.add([t]) for t in ids[:3]]  # "one two three": the stop string completes at the last token
    assert "".join(deltas) == "one two"
    assert stream.finish("one two") == ""


# ---- the router over fake workers --------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_stream_relays_tokens_text_and_usage(cluster: Cluster, tokenizer: PreTrainedTokenizerBase) -> None:
    out = tokenizer.encode(" and then 🙂 done")
    for fake in cluster.decoders.values():
        fake.script = lambda r: Script([[t] for t in out[:-2]] + [out[-2:]])
    prompt = "Hello there"
    msgs = [m async for m in cluster.stub.GenerateStream(generate_request(prompt, "r1", max_new_tokens=20))]
    assert all(m.request_id == "r1" for m in msgs)
    assert [t for m in msgs for t in m.token_ids] == out
    assert "".join(m.text for m in msgs) == tokenizer.decode(out)
    assert all(m.finish_reason == pb.FINISH_REASON_UNSPECIFIED for m in msgs[:-1])
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    assert msgs[-1].usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert msgs[-1].usage.completion_tokens == len(out)
    assert len(cluster.prefill.requests) == 1 and cluster.prefill.requests[0] != "r1"  # workers get the router's id

    resp = await cluster.stub.Generate(generate_request([5, 6, 7, 8], max_new_tokens=20))
    assert len(resp.request_id) == 32  # made up by the router
    assert list(resp.token_ids) == out and resp.text == tokenizer.decode(out)
    assert resp.usage.prompt_tokens == 4


@pytest.mark.asyncio
async def test_stop_text_is_the_final_text(cluster: Cluster, tokenizer: PreTrainedTokenizerBase) -> None:
    out = tokenizer.encode("one two three four")
    for fake in cluster.decoders.values():
        fake.script = lambda r: Script([[t] for t in out], pb.FINISH_REASON_STOP, stop_text="one two")
    msgs = [m async for m in cluster.stub.GenerateStream(generate_request("x", stop=[" three"]))]
    assert "".join(m.text for m in msgs) == "one two"
    assert msgs[-1].finish_reason == pb.FINISH_REASON_STOP
    resp = await cluster.stub.Generate(generate_request("x", stop=[" three"]))
    assert resp.text == "one two" and list(resp.token_ids) == out


@pytest.mark.asyncio
async def test_requests_spread_over_decode_workers(cluster: Cluster) -> None:
    await asyncio.gather(*(cluster.stub.Generate(generate_request([1, 2, 3])) for _ in range(6)))
    assert sorted(len(f.requests) for f in cluster.decoders.values()) == [3, 3]


@pytest.mark.asyncio
async def test_a_refusing_decode_worker_is_skipped(cluster: Cluster) -> None:
    full, other = cluster.decoders.values()
    full.refuse, full.free_rows = True, 8  # reports the most room, then refuses (another router took it)
    await asyncio.sleep(0.2)  # a poll sees the new numbers
    resp = await cluster.stub.Generate(generate_request([1, 2, 3], "r"))
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(other.requests) == 1 and full.requests == []  # (workers know it by the router's id)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("params", "prompt", "field_name"),
    [
        ({"temperature": -1.0}, "hi", "temperature"),
        ({"top_p": 0.0}, "hi", "top_p"),
        ({"max_new_tokens": 0}, "hi", "max_new_tokens"),
        ({"max_new_tokens": 1024}, "hi", "max_new_tokens"),  # prompt + max_new_tokens > context
        ({}, "", "text"),
        ({}, [], "prompt"),
        ({}, [1, 49152], "prompt"),  # outside the vocabulary
    ],
)
async def test_invalid_requests_name_the_field(
    cluster: Cluster, params: dict[str, object], prompt: str | list[int], field_name: str
) -> None:
    for call in (cluster.stub.Generate, cluster.stub.GenerateStream):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            result = call(generate_request(prompt, "", **params))
            if isinstance(result, grpc.aio.UnaryStreamCall):
                async for _ in result:
                    pass
            else:
                await result
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert (e.value.details() or "").startswith(field_name + ":"), e.value.details()
    assert not any(f.requests for f in cluster.decoders.values())


@pytest.mark.asyncio
@pytest.mark.parametrize("rid", ["a\nb", "nul\x00", "tab\there", "bell\x07"])
async def test_a_request_id_with_control_characters_is_refused(cluster: Cluster, rid: str) -> None:
    """Ids reach the logs: a newline or NUL in one would forge or cut log lines (issue 17, probe finding 4)."""
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.stub.Generate(generate_request([5, 6], rid))
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert (e.value.details() or "").startswith("request_id:")
    assert not any(f.requests for f in cluster.decoders.values())


@pytest.mark.asyncio
async def test_cancelled_stream_cancels_the_decode_call(cluster: Cluster) -> None:
    for fake in cluster.decoders.values():
        fake.script = lambda r: Script([[7]] * 500, delay_s=0.02)
    call = cluster.stub.GenerateStream(generate_request([1, 2, 3], "slow", max_new_tokens=500))
    first = await call.read()
    assert list(first.token_ids) == [7]
    call.cancel()
    await until(lambda: any(f.cancelled and f.cancelled == f.requests for f in cluster.decoders.values()))
    await until(lambda: cluster.router.in_flight == 0)


@pytest.mark.asyncio
async def test_cancel_during_prefill_cancels_it_on_both_workers(cluster: Cluster) -> None:
    cluster.prefill.delay_s = 30
    call = cluster.stub.GenerateStream(generate_request([1, 2, 3], "pending"))
    await until(lambda: len(cluster.prefill.requests) == 1)
    call.cancel()
    await until(lambda: cluster.prefill.cancelled == cluster.prefill.requests)
    await until(lambda: any(f.cancelled == cluster.prefill.requests for f in cluster.decoders.values()))


@pytest.mark.asyncio
async def test_a_failed_prefill_fails_the_request_and_cancels_the_decode(cluster: Cluster) -> None:
    cluster.prefill.fail = True
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.stub.Generate(generate_request([1, 2, 3], "doomed"))
    assert e.value.code() is grpc.StatusCode.INTERNAL
    assert "prefill exploded" in (e.value.details() or "")
    await until(lambda: any(f.cancelled and f.cancelled == f.requests for f in cluster.decoders.values()))


@pytest.mark.asyncio
@pytest.mark.parametrize("cluster", [{"max_queue": 1, "queue_timeout_s": 30.0}], indirect=True)
async def test_a_full_queue_refuses_with_resource_exhausted(cluster: Cluster) -> None:
    for fake in cluster.decoders.values():
        fake.free_rows = 0
    await asyncio.sleep(0.2)
    waiting = cluster.stub.Generate(generate_request([1, 2, 3], "waits"))
    await until(lambda: cluster.router.scheduler.queued == 1)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.stub.Generate(generate_request([1, 2, 3], "refused"))
    assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry" in (e.value.details() or "")
    for fake in cluster.decoders.values():  # room again: the waiting request runs
        fake.free_rows = 4
    resp = await waiting
    assert resp.request_id == "waits" and resp.finish_reason == pb.FINISH_REASON_LENGTH


@pytest.mark.asyncio
async def test_the_client_deadline_is_honoured(cluster: Cluster) -> None:
    cluster.prefill.delay_s = 30
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await cluster.stub.Generate(generate_request([1, 2, 3], "late"), timeout=0.5)
    assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: cluster.prefill.cancelled == cluster.prefill.requests != [])
    await until(lambda: cluster.router.in_flight == 0)


@pytest.mark.asyncio
async def test_router_core_generate_directly(cluster: Cluster) -> None:
    """The API the HTTP layer uses: Router.generate yields Deltas; closing it early cancels the request."""
    for fake in cluster.decoders.values():
        fake.script = lambda r: Script([[7]] * 100, delay_s=0.02)
    gen = cluster.router.generate("direct", [1, 2, 3], SamplingParams(max_new_tokens=100))
    ev = await gen.__anext__()
    assert ev.token_ids == [7] and ev.finish_reason is None
    await gen.aclose()
    await until(lambda: any(f.cancelled and f.cancelled == f.requests for f in cluster.decoders.values()))
    assert cluster.router.in_flight == 0


# ---- where workers come from ------------------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_pool_reads_the_registry_and_ignores_other_models(tmp_path: Path) -> None:
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], cwd=tmp_path, stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    registry = RedisRegistry(url)
    pool = WorkerPool(Scheduler(), redis_url=url)
    try:
        await until(lambda: _pings(port))
        occupancy = {"free_rows": 3, "kv_tokens_free": 900, "kv_tokens_used": 100, "active_rows": 1, "waiting": 0}
        await registry.publish(WorkerInfo("decode", "d1:1", FINGERPRINT, occupancy), ttl_s=30)
        await registry.publish(WorkerInfo("prefill", "p1:1", FINGERPRINT, {"waiting": 2}), ttl_s=30)
        await pool.poll()  # the first worker heard from sets the model
        await registry.publish(WorkerInfo("decode", "d2:1", "0" * 64, occupancy), ttl_s=30)
        await pool.poll()
        decode = {w.address: w for w in pool.scheduler.reports(Role.DECODE)}
        assert decode["d1:1"].healthy and decode["d1:1"].decode.free_rows == 3
        assert not decode["d2:1"].healthy  # another model: never chosen
        assert pool.scheduler.reports(Role.PREFILL)[0].load.waiting == 2
        assert all(pool.scheduler.pick_decode(10).address == "d1:1" for _ in range(3))  # type: ignore[union-attr]
        await registry.remove("decode", "d1:1")
        await pool.poll()
        assert [w.address for w in pool.scheduler.reports(Role.DECODE)] == ["d2:1"]  # gone from the registry
    finally:
        await pool.close()
        await registry.close()
        redis.kill()
        redis.wait()


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.mark.asyncio
async def test_pool_marks_unreachable_workers_unhealthy() -> None:
    pool = WorkerPool(Scheduler(), [f"127.0.0.1:{free_port()}"], [f"127.0.0.1:{free_port()}"], poll_s=0.05)
    try:
        await pool.poll()
        assert not any(w.healthy for role in Role for w in pool.scheduler.reports(role))
    finally:
        await pool.close()


# ---- the real processes ------------------------------------------------------------------------------------
REAL = (ROOT / "services/decode/main.py").exists() and (ROOT / "services/prefill/main.py").exists()


@dataclass
class Stack:
    router: str
    decode: str
    prefill: str


def _start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "baton.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                cwd=ROOT)


@pytest.fixture(scope="module")
def stack(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not REAL:
        pytest.skip("the decode and prefill workers are not there yet")
    logs = tmp_path_factory.mktemp("router-stack")
    model = ["--model", str(tiny_llama_dir), "--device", "cpu", "--threads", "1"]
    s = Stack(*(f"127.0.0.1:{free_port()}" for _ in range(3)))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(_start(["decode", "--host", "127.0.0.1", "--port", s.decode.split(":")[1], "--max-batch", "4",
                             *model], logs / "decode.log"))
        procs.append(_start(["prefill", "--host", "127.0.0.1", "--port", s.prefill.split(":")[1], "--decode", s.decode,
                             *model],
                            logs / "prefill.log"))
        procs.append(_start(["router", "--host", "127.0.0.1", "--grpc-port", s.router.split(":")[1],
                             "--http-port", "0", "--decode", s.decode, "--prefill", s.prefill, *model],
                            logs / "router.log"))
        for address, proc in zip((s.decode, s.prefill, s.router), procs):
            wait_serving(address, proc, 120)
        yield s
    except (RuntimeError, TimeoutError) as e:
        raise RuntimeError(f"{e}; logs in {logs}") from e
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()



def test_real_stack_greedy_output_equals_generate(stack: Stack, tiny_llama: LoadedModel) -> None:
    tok = tiny_llama.tokenizer
    assert tok is not None
    with grpc.insecure_channel(stack.router) as ch:
        stub = baton_pb2_grpc.RouterStub(ch)
        text = "The quick brown fox"
        ids = list(tok.encode(text))
        want = reference(tiny_llama, ids, 12)
        resp = stub.Generate(generate_request(text, "text-unary", max_new_tokens=12, ignore_eos=True), timeout=60)
        assert list(resp.token_ids) == want
        assert resp.text == tok.decode(want, skip_special_tokens=True)
        assert resp.usage.prompt_tokens == len(ids) and resp.usage.completion_tokens == 12

        ids2 = [5, 17, 300, 4000, 42, 9]
        want2 = reference(tiny_llama, ids2, 10)
        msgs = list(stub.GenerateStream(generate_request(ids2, "ids-stream", max_new_tokens=10, ignore_eos=True),
                                        timeout=60))
        assert [t for m in msgs for t in m.token_ids] == want2
        assert "".join(m.text for m in msgs) == tok.decode(want2, skip_special_tokens=True)
        assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and msgs[-1].usage.completion_tokens == 10

        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(generate_request("hi", top_k=-0, temperature=200.0), timeout=60)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith("temperature:")


def test_real_stack_cancel_reaches_the_decode_worker(stack: Stack) -> None:
    with grpc.insecure_channel(stack.router) as ch, worker_channel(stack.decode) as dch:
        decode = baton_pb2_grpc.DecodeWorkerStub(dch)
        before = decode.Occupancy(pb.OccupancyRequest(), timeout=10)
        call = baton_pb2_grpc.RouterStub(ch).GenerateStream(
            generate_request([5, 6, 7], "to-cancel", max_new_tokens=900, ignore_eos=True), timeout=120
        )
        first = next(call)
        assert len(first.token_ids) >= 1
        assert decode.Occupancy(pb.OccupancyRequest(), timeout=10).active_rows == 1
        call.cancel()
        deadline = time.monotonic() + 20
        while decode.Occupancy(pb.OccupancyRequest(), timeout=10).active_rows != 0:
            assert time.monotonic() < deadline, "the decode worker still holds the cancelled request"
            time.sleep(0.05)
        after = decode.Occupancy(pb.OccupancyRequest(), timeout=10)
        assert after.completed == before.completed  # it was dropped, not finished
