"""The whole system as users run it: router, a prefill worker and two decode workers as real processes, with a
real Redis as the registry. Greedy outputs must equal `generate()` on each prompt alone, token for token."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from baton.engine.models import LoadedModel
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from tests.support.oracle import reference
from tests.support.processes import free_port, occupancy, processes, wait_idle, worker_channel

MAX_BATCH = 4
LOCAL_PREFILL_TOKENS = 8  # router-local's --local-prefill-tokens


@dataclass
class Stack:
    router: str  # gRPC host:port
    http: str  # base URL of the OpenAI API
    decode: list[str]
    prefill: list[str]
    router_local: str  # gRPC host:port of a second router, whose short prompts are prefilled by decode workers


@pytest.fixture(scope="module")
def stack(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with processes(tmp_path_factory.mktemp("e2e-logs")) as ps:
        redis = ps.redis()
        # the workers take turns on the cores as under `baton serve` on a CPU machine (baton/shared_cores.py)
        cores = ["--shared-cores", str(tmp_path_factory.mktemp("cores") / "cores")]
        model = ["--model", str(tiny_llama_dir), "--threads", "1", *cores]
        decode = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        prefill = [f"127.0.0.1:{free_port()}"]
        for i, addr in enumerate(decode):
            ps.baton(
                f"decode{i}",
                "decode",
                "--host",
                "127.0.0.1",
                "--port",
                addr.split(":")[1],
                "--redis",
                redis,
                "--max-batch",
                str(MAX_BATCH),
                "--heartbeat-s",
                "0.3",
                *model,
                wait_address=addr,
            )
        ps.baton(
            "prefill",
            "prefill",
            "--host",
            "127.0.0.1",
            "--port",
            prefill[0].split(":")[1],
            "--redis",
            redis,
            "--heartbeat-s",
            "0.3",
            *model,
            wait_address=prefill[0],
        )
        grpc_port, http_port = free_port(), free_port()
        ps.baton(
            "router",
            "router",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
            "--redis",
            redis,
            "--model",
            str(tiny_llama_dir),
            "--served-model-name",  # the name the requests below give
            "baton",
            wait_address=f"127.0.0.1:{grpc_port}",
        )
        local_port = free_port()
        ps.baton("router-local", "router", "--host", "127.0.0.1", "--grpc-port", str(local_port), "--http-port",
                 str(free_port()), "--redis", redis, "--model", str(tiny_llama_dir), "--local-prefill-tokens",
                 str(LOCAL_PREFILL_TOKENS), wait_address=f"127.0.0.1:{local_port}")
        http = f"http://127.0.0.1:{http_port}"
        for _ in range(100):  # the router's HTTP side comes up with its gRPC side; wait for both workers too
            try:
                if httpx.get(f"{http}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield Stack(f"127.0.0.1:{grpc_port}", http, decode, prefill, f"127.0.0.1:{local_port}")



WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
    "in",
    "an",
    "old",
    "green",
    "tree",
]


def text_prompt(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 11))


def test_64_concurrent_requests_equal_generate_and_kv_crosses_grpc(stack: Stack, tiny_llama: LoadedModel) -> None:
    tok = tiny_llama.tokenizer
    assert tok is not None
    before = [occupancy(a) for a in stack.decode]

    async def via_openai() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{stack.http}/v1", api_key="unused", max_retries=0)

        async def one(i: int) -> str:
            r = await client.completions.create(
                model="baton", prompt=text_prompt(i), max_tokens=6 + i % 9, temperature=0
            )
            return r.choices[0].text

        return list(await asyncio.gather(*(one(i) for i in range(32))))

    async def via_grpc() -> list[list[int]]:
        async with grpc.aio.insecure_channel(stack.router) as ch:
            stub = baton_pb2_grpc.RouterStub(ch)

            async def one(i: int) -> list[int]:
                ids = tok(text_prompt(100 + i))["input_ids"]
                req = pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=ids), parameters=pb.SamplingParameters(max_new_tokens=5 + i % 7)
                )
                got: list[int] = []
                async for msg in stub.GenerateStream(req):
                    got += msg.token_ids
                return got

            return list(await asyncio.gather(*(one(i) for i in range(32))))

    async def both() -> tuple[list[str], list[list[int]]]:
        texts, ids = await asyncio.gather(via_openai(), via_grpc())
        return texts, ids

    texts, token_ids = asyncio.run(both())
    for i, text in enumerate(texts):
        ref = reference(tiny_llama, tok(text_prompt(i))["input_ids"], 6 + i % 9, ignore_eos=False)
        assert text == tok.decode(ref, skip_special_tokens=True), f"openai request {i} diverged"
    for i, got in enumerate(token_ids):
        want = reference(tiny_llama, tok(text_prompt(100 + i))["input_ids"], 5 + i % 7, ignore_eos=False)
        assert got == want, f"grpc {i} diverged"

    after = [occupancy(a) for a in stack.decode]
    received = [a.kv_received - b.kv_received for a, b in zip(after, before)]
    completed = [a.completed - b.completed for a, b in zip(after, before)]
    assert sum(received) == 64 and sum(completed) == 64  # every request's KV came over gRPC from the prefill worker
    assert all(c > 0 for c in completed)  # both decode workers took requests
    wait_idle(stack.decode, stack.prefill)


def test_short_prompts_are_prefilled_by_the_decode_worker(stack: Stack, tiny_llama: LoadedModel) -> None:
    """A router with --local-prefill-tokens: prompts that short go to a decode worker with prefill_here and are
    prefilled inside its batch (no KV push), longer ones through the prefill worker; all equal generate()."""
    prompts = [[7 + i] * n for i, n in enumerate([3, 8, 9, 30, 1, 20, 5, 12])]
    local = sum(len(p) <= LOCAL_PREFILL_TOKENS for p in prompts)
    before = [occupancy(a) for a in stack.decode]

    async def run() -> list[list[int]]:
        async with grpc.aio.insecure_channel(stack.router_local) as ch:
            stub = baton_pb2_grpc.RouterStub(ch)

            async def one(ids: list[int]) -> list[int]:
                params = pb.SamplingParameters(max_new_tokens=7, ignore_eos=True)
                got: list[int] = []
                async for msg in stub.GenerateStream(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                                                        parameters=params)):
                    got += msg.token_ids
                return got

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    for ids, got in zip(prompts, asyncio.run(run())):
        assert got == reference(tiny_llama, ids, 7), f"prompt of {len(ids)} tokens diverged"
    after = [occupancy(a) for a in stack.decode]
    assert sum(a.kv_received - b.kv_received for a, b in zip(after, before)) == len(prompts) - local
    assert sum(a.completed - b.completed for a, b in zip(after, before)) == len(prompts)
    wait_idle(stack.decode, stack.prefill)


class LongRequests:
    """Requests started directly on one decode worker (bypassing the router) to fill its batch."""

    def __init__(self, stack: Stack, decode: str, n: int) -> None:
        self.channels = [worker_channel(decode), worker_channel(stack.prefill[0])]
        dstub = baton_pb2_grpc.DecodeWorkerStub(self.channels[0])
        pstub = baton_pb2_grpc.PrefillWorkerStub(self.channels[1])
        self.calls = []
        for i in range(n):
            wreq = pb.WorkerRequest(
                request_id=f"long-{decode}-{i}-{time.monotonic_ns()}",
                prompt_ids=[5, 6, 7, 8],
                parameters=pb.SamplingParameters(max_new_tokens=1000, ignore_eos=True),
            )
            call = dstub.Decode(pb.DecodeRequest(request=wreq, kv_timeout_seconds=30))
            next(call)  # the reservation is confirmed
            pstub.Prefill(pb.PrefillRequest(request=wreq, decode_address=decode), timeout=30)
            self.calls.append(call)

    def cancel(self) -> None:
        for call in self.calls:
            call.cancel()
        for ch in self.channels:
            ch.close()


def test_occupancy_routing_full_worker_avoided_then_queue(stack: Stack, tiny_llama: LoadedModel) -> None:
    tok = tiny_llama.tokenizer
    assert tok is not None
    d1, d2 = stack.decode
    fill1 = LongRequests(stack, d1, MAX_BATCH)
    fill2: LongRequests | None = None
    try:
        assert occupancy(d1).free_rows == 0
        with grpc.insecure_channel(stack.router) as ch:
            stub = baton_pb2_grpc.RouterStub(ch)
            base = [occupancy(a).completed for a in (d1, d2)]
            for i in range(3):  # d1 is full: these must all go to d2
                r = stub.Generate(
                    pb.GenerateRequest(text=text_prompt(i), parameters=pb.SamplingParameters(max_new_tokens=4)),
                    timeout=60,
                )
                assert list(r.token_ids) == reference(tiny_llama, tok(text_prompt(i))["input_ids"], 4, ignore_eos=False)
            assert [occupancy(a).completed for a in (d1, d2)] == [base[0], base[1] + 3]

            fill2 = LongRequests(stack, d2, MAX_BATCH)  # now both are full: requests wait in the router's queue
            results: dict[int, list[int]] = {}

            def send(i: int) -> None:
                r = stub.Generate(
                    pb.GenerateRequest(text=text_prompt(i), parameters=pb.SamplingParameters(max_new_tokens=4)),
                    timeout=60,
                )
                results[i] = list(r.token_ids)

            waiters = [threading.Thread(target=send, args=(i,)) for i in (20, 21)]
            for t in waiters:
                t.start()
            time.sleep(1.5)
            assert not results, "a request ran although every decode worker was full"
            assert all(occupancy(a).free_rows == 0 for a in (d1, d2))
            fill1.cancel()  # rows free up: the queued requests run
            for t in waiters:
                t.join(timeout=60)
            for i in (20, 21):
                assert results[i] == reference(tiny_llama, tok(text_prompt(i))["input_ids"], 4, ignore_eos=False)
    finally:
        fill1.cancel()
        if fill2:
            fill2.cancel()
    wait_idle(stack.decode, stack.prefill)


def test_cancel_and_disconnect_leave_nothing_behind(stack: Stack) -> None:
    async def grpc_cancels() -> None:
        async with grpc.aio.insecure_channel(stack.router) as ch:
            stub = baton_pb2_grpc.RouterStub(ch)
            calls = []
            for i in range(12):
                req = pb.GenerateRequest(
                    text=text_prompt(i), parameters=pb.SamplingParameters(max_new_tokens=500, ignore_eos=True)
                )
                calls.append(stub.GenerateStream(req))
            for i, call in enumerate(calls):
                if i % 2:  # half after their first token, half at once (while queued or prefilling)
                    await call.read()
                call.cancel()

    async def http_disconnects() -> None:
        async with httpx.AsyncClient(base_url=stack.http, timeout=60) as client:
            for i in range(4):
                body = {
                    "model": "baton",
                    "prompt": text_prompt(i),
                    "max_tokens": 500,
                    "stream": True,
                    "ignore_eos": True,
                }
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            break  # the client goes away mid-stream

    asyncio.run(grpc_cancels())
    asyncio.run(http_disconnects())
    wait_idle(stack.decode, stack.prefill)


def test_a_conversation_stays_where_its_history_is(stack: Stack, tiny_llama: LoadedModel) -> None:
    """Decode workers publish the blocks their prefix caches hold (finished turns' KV); the router sends each
    next turn of a conversation to the worker holding its history, where two equal workers would otherwise take
    turns; every answer equals generate() on the whole conversation."""
    with grpc.insecure_channel(stack.router) as ch:
        stub = baton_pb2_grpc.RouterStub(ch)
        for c in range(2):
            history = [40 + c + i % 7 for i in range(40)]  # 2 whole blocks and more
            served: list[int] = []
            for turn in range(3):
                prompt = history + [300 + 10 * c + turn] * 5
                before = [occupancy(a).completed for a in stack.decode]
                out = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                                       parameters=pb.SamplingParameters(max_new_tokens=6,
                                                                                        ignore_eos=True)), timeout=60)
                assert list(out.token_ids) == reference(tiny_llama, prompt, 6)
                history = prompt + list(out.token_ids)
                deadline = time.monotonic() + 10
                while True:
                    done = [occupancy(a).completed - b for a, b in zip(stack.decode, before)]
                    if sum(done) == 1 or time.monotonic() > deadline:
                        break
                    time.sleep(0.05)
                served.append(done.index(1))
                time.sleep(1.0)  # the workers' next heartbeats publish what their caches now hold
            assert len(set(served)) == 1, f"conversation {c} moved between decode workers: {served}"
    assert any(occupancy(a).prefix_blocks for a in stack.decode)
    wait_idle(stack.decode, stack.prefill)
