"""Recovery without processes: a resumed request continues exactly (engine), the router resumes requests whose
workers fail (against fake workers), the scheduler and pool keep workers through Redis trouble, and a decode
worker hands its requests off at the end of a drain."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from transformers import PreTrainedTokenizerBase

from baton.engine.engine import Engine
from baton.engine.models import LoadedModel
from baton.engine.request import FinishReason, Request, SamplingParams
from baton.engine.runner import ModelRunner
from baton.engine.sampler import choice_seed
from baton.errors import InvalidRequestError, KvLeaseExpired, KvPushFailed, Reason, Unavailable
from baton.rpc.load import DecodeLoad, Role
from baton.rpc.registry import RedisRegistry, WorkerInfo
from baton.rpc.server import Service, create_server
from baton.rpc.status import abort_with
from baton.serve import free_port
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from services.decode.worker import DecodeWorker
from services.router.core import Router
from services.router.pool import WorkerPool
from services.router.scheduler import Scheduler, WorkerReport
from services.router.text import Delta
from tests.conftest import TINY_SPEC
from tests.test_decode_worker import collect, kv_for, make, prompt, run_with_worker

FINGERPRINT = "f" * 64


# ---- the engine: a resumed request is the same request -------------------------------------------------------
def run_alone(lm: LoadedModel, req: Request) -> Request:
    engine = Engine(lm, max_batch=2)
    engine.add_prefilled(req, ModelRunner(lm).prefill(req))
    engine.run_until_done()
    return req


SAMPLINGS = [
    {},  # greedy
    {"temperature": 0.9, "top_k": 50, "seed": 7},
    {"temperature": 1.0, "top_p": 0.9, "repetition_penalty": 1.3, "seed": 3},
]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "seeded-top-k", "seeded-top-p-penalty"])
def test_a_resumed_request_continues_exactly(tiny_llama: LoadedModel, sampling: dict[str, object]) -> None:
    ids = prompt(21, 9)
    ref = run_alone(tiny_llama, make("r", ids, 24, **sampling)).output_ids
    assert len(ref) == 24
    for k in (1, 8, 23):
        resumed = Request("r", ids, make("r", ids, 24, **sampling).params, output_ids=ref[:k])
        payload = ModelRunner(tiny_llama).prefill(resumed)
        assert payload.prompt_ids == ids + ref[:k] and payload.first_token == ref[k]
        run_alone(tiny_llama, resumed)
        assert resumed.output_ids == ref and resumed.finish_reason is FinishReason.LENGTH, k


def test_a_stop_string_across_the_resume_point_is_seen(tiny_llama: LoadedModel) -> None:
    tok = tiny_llama.tokenizer
    assert tok is not None
    ids = prompt(22, 7)
    ref = run_alone(tiny_llama, make("s", ids, 30)).output_ids
    k = 12
    head = tok.decode(ref[:k], skip_special_tokens=True)
    text = tok.decode(ref, skip_special_tokens=True)
    assert text.startswith(head) and len(text) > len(head) + 3
    stop = text[len(head) - 2 : len(head) + 3]  # the last characters of token k-1 and the first of what follows
    whole = run_alone(tiny_llama, make("s", ids, 30, stop=(stop,)))
    assert whole.finish_reason is FinishReason.STOP and len(whole.output_ids) > k
    resumed = Request("s", ids, whole.params, output_ids=ref[:k])
    run_alone(tiny_llama, resumed)
    assert (resumed.output_ids, resumed.stop_text) == (whole.output_ids, whole.stop_text)


def test_resumed_requests_are_checked() -> None:
    with pytest.raises(InvalidRequestError, match="output_ids"):
        Request("x", [5, 6], SamplingParams(max_new_tokens=2), output_ids=[7, 8])
    with pytest.raises(InvalidRequestError, match="output_ids"):
        Request("x", [5, 6], SamplingParams(max_new_tokens=4), output_ids=[-1])


# ---- the router against fake workers ---------------------------------------------------------------------
def token(prompt_ids: list[int], i: int, seed: int | None = None) -> int:
    """The fake model: the i-th output token of a prompt (sampled with `seed`)."""
    return (sum(prompt_ids) * 31 + i * 17 + (seed or 0) % 97) % 1000 + 3


def expected(prompt_ids: list[int], n: int) -> list[int]:
    return [token(prompt_ids, i) for i in range(n)]


@dataclass
class FakeDecode(baton_pb2_grpc.DecodeWorkerServicer):
    """Generates the fake model's tokens from where the request says it is (output_ids); `fail_after` tokens
    into a request it fails as told: "unavailable" (dies), "cancelled" (ends CANCELLED unasked), "eof"."""

    fail_after: int | None = None
    failure: str = "unavailable"
    stall: bool = False  # stop sending after fail_after tokens, without failing
    lease_text: str = "no KV arrived within the lease"  # the words of its KV lease's end (they decide nothing)
    seen: list[pb.WorkerRequest] = field(default_factory=list)
    kv: dict[str, asyncio.Event] = field(default_factory=dict)

    def kv_event(self, rid: str) -> asyncio.Event:
        return self.kv.setdefault(rid, asyncio.Event())

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        wr = request.request
        self.seen.append(wr)
        yield pb.DecodeResponse()
        try:
            await asyncio.wait_for(self.kv_event(wr.request_id).wait(), request.kv_timeout_seconds)
        except asyncio.TimeoutError:  # as the real worker ends its lease: by reason, in any words
            await abort_with(context, KvLeaseExpired(self.lease_text), "Decode")
        self.kv.pop(wr.request_id, None)
        prompt_ids, start, end = list(wr.prompt_ids), len(wr.output_ids), wr.parameters.max_new_tokens
        seed = wr.parameters.seed if wr.parameters.HasField("seed") else None
        if wr.n > 1:  # choice j samples with choice_seed(seed, j), a step of every choice at a time
            for i in range(end):
                if self.fail_after is not None and i >= self.fail_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "worker went away")
                for j in range(wr.n):
                    yield pb.DecodeResponse(token_ids=[token(prompt_ids, i, choice_seed(seed, j))], index=j,
                                            finish_reason=pb.FINISH_REASON_LENGTH if i == end - 1
                                            else pb.FINISH_REASON_UNSPECIFIED)
                await asyncio.sleep(0.005)
            return
        for i in range(start, end):
            if self.fail_after is not None and i - start >= self.fail_after:
                if self.stall:
                    await asyncio.sleep(3600)
                if self.failure == "unavailable":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "worker went away")
                if self.failure == "cancelled":
                    yield pb.DecodeResponse(finish_reason=pb.FINISH_REASON_CANCELLED)
                return
            msg = pb.DecodeResponse(token_ids=[token(prompt_ids, i, seed)])
            if i == end - 1:
                msg.finish_reason = pb.FINISH_REASON_LENGTH
            yield msg
            await asyncio.sleep(0.005)

    async def Occupancy(self, request: pb.OccupancyRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        return pb.OccupancyResponse(free_rows=4, kv_tokens_free=100_000, model_fingerprint=FINGERPRINT)


@dataclass
class FakePrefill(baton_pb2_grpc.PrefillWorkerServicer):
    decoders: dict[str, FakeDecode]
    fail: list[Exception] = field(default_factory=list)  # failures to answer, in order
    lose: int = 0  # KV pushes to lose (the prefill says it succeeded)
    seen: list[pb.PrefillRequest] = field(default_factory=list)

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        self.seen.append(request)
        if self.fail:
            await abort_with(context, self.fail.pop(0), "Prefill")  # as the real worker: by reason
        if self.lose:
            self.lose -= 1
        else:
            self.decoders[request.decode_address].kv_event(request.request.request_id).set()
        return pb.PrefillResponse(request_id=request.request.request_id)

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        return pb.CancelResponse(found=False)

    async def Occupancy(self, request: pb.OccupancyRequest, context: grpc.aio.ServicerContext):  # noqa: N802
        return pb.OccupancyResponse(model_fingerprint=FINGERPRINT)


@dataclass
class Fakes:
    router: Router
    decoders: dict[str, FakeDecode]
    prefills: dict[str, FakePrefill]

    def decode(self, i: int) -> FakeDecode:
        """The i-th in address order: the scheduler's first pick is worker 0 (ties go round-robin by address)."""
        return self.decoders[sorted(self.decoders)[i]]

    def prefill(self, i: int) -> FakePrefill:
        return self.prefills[sorted(self.prefills)[i]]


@pytest_asyncio.fixture
async def fakes(tokenizer: PreTrainedTokenizerBase) -> AsyncIterator[Fakes]:
    decoders = {f"127.0.0.1:{free_port()}": FakeDecode() for _ in range(2)}
    prefills = {f"127.0.0.1:{free_port()}": FakePrefill(decoders) for _ in range(2)}
    servers = [create_server([Service(f, baton_pb2_grpc.add_DecodeWorkerServicer_to_server, "d")], a)[0]
               for a, f in decoders.items()]
    servers += [create_server([Service(f, baton_pb2_grpc.add_PrefillWorkerServicer_to_server, "p")], a)[0]
                for a, f in prefills.items()]
    for s in servers:
        await s.start()
    pool = WorkerPool(Scheduler(), list(decoders), list(prefills), poll_s=0.05)
    router = Router(tokenizer, "tiny", TINY_SPEC, pool)
    await router.start()
    try:
        yield Fakes(router, decoders, prefills)
    finally:
        await router.close()
        for s in servers:
            await s.stop(None)


async def run(router: Router, rid: str, prompt_ids: list[int], max_new: int) -> list[Delta]:
    return [ev async for ev in router.generate(rid, prompt_ids, SamplingParams(max_new_tokens=max_new))]


def recovered(router: Router, kind: str) -> float:
    return router.metrics.value("baton_router_recoveries_total", kind=kind)


def tokens_of(events: list[Delta]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


@pytest.mark.asyncio
@pytest.mark.parametrize("failure", ["unavailable", "cancelled", "eof"])
async def test_a_request_resumes_where_its_decode_worker_failed(fakes: Fakes, failure: str) -> None:
    fakes.decode(0).fail_after, fakes.decode(0).failure = 5, failure
    ids = [11, 12, 13]
    events = await run(fakes.router, "r", ids, 12)
    assert tokens_of(events) == expected(ids, 12)  # nothing lost, repeated or changed
    last = events[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == (FinishReason.LENGTH, 3, 12)
    # It started on worker 0, which failed 5 tokens in, and went on on worker 1 from there.
    assert [list(r.output_ids) for r in fakes.decode(0).seen] == [[]]
    assert [(list(r.prompt_ids), list(r.output_ids)) for r in fakes.decode(1).seen] == [(ids, expected(ids, 5))]
    assert recovered(fakes.router, "resumed") == 1 and fakes.router.in_flight == 0


@pytest.mark.asyncio
async def test_choices_whose_decode_worker_failed_go_on_on_their_own(fakes: Fakes) -> None:
    """n = 3 from one prefill on worker 0, which dies 4 steps in: each choice goes on as a request of its own
    (seed choice_seed(seed, j)) from the tokens it streamed, so every choice is the one an undisturbed run gives."""
    fakes.decode(0).fail_after = 4
    ids = [21, 22]
    events = [ev async for ev in fakes.router.generate("c", ids, SamplingParams(max_new_tokens=10, seed=5,
                                                                                temperature=1.0), n=3)]
    for j in range(3):
        mine = [ev for ev in events if ev.index == j]
        assert tokens_of(mine) == [token(ids, i, choice_seed(5, j)) for i in range(10)], f"choice {j}"
        assert mine[-1].finish_reason is FinishReason.LENGTH and mine[-1].completion_tokens == 10
    assert [r.n for r in fakes.decode(0).seen] == [3]
    resumed = sorted((r.request_id.rsplit("/", 1)[1], len(r.output_ids), r.parameters.seed)
                     for r in fakes.decode(1).seen)
    assert resumed == [(str(j), 4, choice_seed(5, j)) for j in range(3)]
    assert fakes.router.in_flight == 0


@pytest.mark.asyncio
async def test_a_worker_that_leaves_the_registry_has_its_requests_resumed(fakes: Fakes) -> None:
    for fake in fakes.decoders.values():
        fake.fail_after, fake.stall = 3, True  # hangs: its stream never breaks
    gen = fakes.router.generate("h", [4, 5], SamplingParams(max_new_tokens=10))
    got = [t for _ in range(3) for t in (await gen.__anext__()).token_ids]
    first = next(a for a, f in fakes.decoders.items() if f.seen)
    for fake in fakes.decoders.values():
        fake.fail_after = None
    fakes.router.pool.lost(first)  # what the pool does when the worker's registry record expires
    async for ev in gen:
        got += ev.token_ids
    assert got == expected([4, 5], 10)


# Each failure worded as the real workers word it, then in words that say nothing, then in the words of another
# failure: the router decides on the reason and the field alone, so every wording is handled alike.
WORDINGS = {
    "as-the-workers-say": ("gone", "KV push to decode worker x failed: no reservation", "no KV arrived in time"),
    "reworded": ("x", "y", "z"),
    "misleading": ("KV push to decode worker failed", "no KV arrived", "KV push to decode worker x failed"),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("wording", list(WORDINGS))
async def test_prefill_failures_are_retried_then_reported(fakes: Fakes, wording: str) -> None:
    gone, push_failed, lease = WORDINGS[wording]
    for fake in fakes.decoders.values():
        fake.lease_text = lease
    fakes.prefill(0).fail = [Unavailable(gone)]  # the first one picked dies
    assert tokens_of(await run(fakes.router, "p", [7, 8], 6)) == expected([7, 8], 6)
    assert recovered(fakes.router, "prefill_retry") == 1
    assert [len(fakes.prefill(i).seen) for i in (0, 1)] == [1, 1]
    await asyncio.sleep(0.2)  # a later report brings the worker that failed back

    # A failed KV push (the decode side lost the reservation): a new attempt, with a new row.
    for p in fakes.prefills.values():
        p.fail = [KvPushFailed(push_failed, Reason.NOT_FOUND)]
    assert tokens_of(await run(fakes.router, "q", [9], 6)) == expected([9], 6)
    assert recovered(fakes.router, "restarted") in (1, 2)

    # KV that never arrives: the decode worker's lease ends the reservation, and another attempt starts.
    fakes.router.kv_timeout_s = 0.3
    fakes.prefill(0).lose = fakes.prefill(1).lose = 1
    assert tokens_of(await run(fakes.router, "l", [2, 3], 5)) == expected([2, 3], 5)
    assert recovered(fakes.router, "restarted") >= 2

    for fake in fakes.decoders.values():  # every attempt fails: bounded, then UNAVAILABLE naming each failure
        fake.fail_after, fake.failure = 2, "cancelled"
    with pytest.raises(Unavailable, match="failed 4 times.*decode worker"):
        await run(fakes.router, "z", [3, 4], 9)
    assert recovered(fakes.router, "gave_up") == 1 and fakes.router.in_flight == 0


# ---- the scheduler and the pool through failures --------------------------------------------------------------
def test_a_failed_worker_stays_unhealthy_until_a_newer_report() -> None:
    now = [100.0]
    s = Scheduler(clock=lambda: now[0])
    room = DecodeLoad(free_rows=4, kv_tokens_free=1000)
    s.update(Role.DECODE, [WorkerReport("a", room, as_of=99.0)])
    t = s.pick_decode(10)
    assert t is not None
    s.failed(t)
    s.update(Role.DECODE, [WorkerReport("a", room, as_of=99.0)])  # the same record again
    assert s.pick_decode(10) is None
    s.update(Role.DECODE, [WorkerReport("a", room, as_of=101.0)])  # it heartbeat since
    assert s.pick_decode(10) is not None


def _redis(port: int, cwd: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], cwd=cwd, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


@pytest.mark.asyncio
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
async def test_the_pool_keeps_workers_while_redis_is_down_or_restarted(tmp_path: Path) -> None:
    port = free_port()
    redis = _redis(port, tmp_path)
    url = f"redis://127.0.0.1:{port}/0"
    registry = RedisRegistry(url)
    pool = WorkerPool(Scheduler(), redis_url=url, restart_grace_s=0.5)

    d, p = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"  # nobody listens there

    def known() -> list[str]:
        return sorted(w.address for role in Role for w in pool.scheduler.reports(role) if w.healthy)

    try:
        occ = {"free_rows": 3, "kv_tokens_free": 900}
        await registry.publish(WorkerInfo("decode", d, FINGERPRINT, occ), ttl_s=30)
        await registry.publish(WorkerInfo("prefill", p, FINGERPRINT, {}), ttl_s=30)
        await pool.poll()
        assert known() == sorted([d, p])
        gone = pool.gone(d)
        redis.kill()
        redis.wait()
        await pool.poll()  # unreadable: the last known workers stay
        assert known() == sorted([d, p])
        redis = _redis(port, tmp_path)  # back, empty
        await pool.poll()
        assert known() == sorted([d, p]) and not gone.is_set()  # kept while they register again
        await registry.publish(WorkerInfo("prefill", p, FINGERPRINT, {}), ttl_s=30)  # one does
        await asyncio.sleep(0.6)
        await pool.poll()
        assert known() == [p]  # the other never came back, and does not answer: gone, its requests resume
        await asyncio.wait_for(gone.wait(), 5)

        # One that misses its heartbeats but answers (a busy machine) keeps its requests.
        alive = f"127.0.0.1:{free_port()}"
        server = create_server([Service(FakeDecode(), baton_pb2_grpc.add_DecodeWorkerServicer_to_server, "d")],
                               alive)[0]
        await server.start()
        try:
            await registry.publish(WorkerInfo("decode", alive, FINGERPRINT, occ), ttl_s=30)
            await pool.poll()
            still = pool.gone(alive)
            await registry.remove("decode", alive)
            await pool.poll()
            await asyncio.sleep(1.0)
            assert not still.is_set()
        finally:
            await server.stop(None)
    finally:
        await pool.close()
        await registry.close()
        redis.kill()
        redis.wait()


# ---- the decode worker: drain and hand-off ------------------------------------------------------------------
def test_hand_off_ends_live_requests_unavailable_and_frees_the_rows(tiny_llama: LoadedModel) -> None:
    running, reserved = make("run", prompt(31, 6), 900), make("res", prompt(32, 4))

    async def body(worker: DecodeWorker) -> None:
        tasks = [asyncio.create_task(collect(worker.reserve(r))) for r in (running, reserved)]
        worker.deliver_kv(kv_for(tiny_llama, running))
        while not running.output_ids:
            await asyncio.sleep(0.01)
        drain = asyncio.create_task(worker.drain())
        await asyncio.sleep(0.05)
        occ = worker.occupancy()
        assert (occ.free_rows, occ.kv_tokens_free, occ.active_rows) == (0, 0, 2)  # draining: takes nothing new
        assert not drain.done()
        assert worker.hand_off() == 2
        for task in tasks:
            with pytest.raises(Unavailable, match="handed off"):
                await task
        await asyncio.wait_for(drain, 5)
        while worker.occupancy().kv_tokens_used:
            await asyncio.sleep(0.01)
        assert worker.occupancy().active_rows == 0

    run_with_worker(tiny_llama, body, max_batch=2)

