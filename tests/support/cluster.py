"""A Baton cluster of real processes for recovery tests: Redis, a router, prefill and decode workers, each on a
fixed port, so that any part can be killed (SIGKILL), stopped (SIGTERM) and started again under the same address.
Also a load client that streams requests through the router and records what each client saw."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import openai
import torch

from baton.bench.exactness import reference
from baton.engine.models import LoadedModel
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc
from tests.support.processes import ROOT, free_port, wait_serving


@dataclass
class Cluster:
    model: Path
    logs: Path
    decode: list[str]
    prefill: list[str]
    router: str  # gRPC host:port
    http: str  # base URL of the OpenAI API
    redis_port: int
    drain_s: float = 60.0
    max_batch: int = 8
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @classmethod
    def create(cls, model: Path, logs: Path, decode: int = 2, prefill: int = 2, **kw: Any) -> Cluster:
        return cls(model, logs, [f"127.0.0.1:{free_port()}" for _ in range(decode)],
                   [f"127.0.0.1:{free_port()}" for _ in range(prefill)], f"127.0.0.1:{free_port()}",
                   f"http://127.0.0.1:{free_port()}", free_port(), **kw)

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def workers(self) -> list[str]:
        return [f"decode{i}" for i in range(len(self.decode))] + [f"prefill{i}" for i in range(len(self.prefill))]

    def start_all(self) -> None:
        self.start_redis()
        for name in self.workers:
            self.start(name, wait=False)
        for name in self.workers:
            self.wait(name)
        self.start("router")

    def start_redis(self) -> None:
        self.procs["redis"] = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=(self.logs / "redis.log").open("ab"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def address(self, name: str) -> str:
        if name == "router":
            return self.router
        return (self.decode if name.startswith("decode") else self.prefill)[int(name[-1])]

    def start(self, name: str, wait: bool = True) -> None:
        model = ["--model", str(self.model), "--threads", "1"]
        port = self.address(name).split(":")[1]
        if name == "router":
            argv = ["router", "--host", "127.0.0.1", "--grpc-port", port, "--http-port", self.http.rsplit(":", 1)[1],
                    "--redis", self.redis_url, "--max-queue", "2048", "--queue-timeout-s", "120", *model]
        elif name.startswith("decode"):
            argv = ["decode", "--host", "127.0.0.1", "--port", port, "--redis", self.redis_url, "--heartbeat-s", "1.0",
                    "--max-batch", str(self.max_batch), "--drain-s", str(self.drain_s), *model]
        else:
            argv = ["prefill", "--host", "127.0.0.1", "--port", port, "--redis", self.redis_url, "--heartbeat-s", "1.0",
                    *model]
        log = self.logs / f"{name}.log"
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "baton.cli", *argv], cwd=ROOT,
                                            stdout=log.open("ab"), stderr=subprocess.STDOUT)
        if wait:
            self.wait(name)

    def wait(self, name: str) -> None:
        wait_serving(self.address(name), self.procs[name], self.logs / f"{name}.log")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()
        proc.wait()

    def terminate(self, name: str, timeout: float = 60.0) -> int:
        proc = self.procs[name]
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def stop_all(self) -> None:
        for name in ["router", *self.workers, "redis"]:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def router_lines(self) -> list[dict[str, Any]]:
        """The router's request log: one JSON object per request."""
        out = []
        for line in (self.logs / "router.log").read_text(errors="replace").splitlines():
            m = re.search(r"services\.router\.core: (\{\"request_id\".*\})$", line)
            if m:
                out.append(json.loads(m.group(1)))
        return out


# ---- load ---------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one client saw."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish: int = 0
    usage: tuple[int, int] | None = None
    error: str | None = None


async def stream(stub: baton_pb2_grpc.RouterStub, req: pb.GenerateRequest, out: Outcome, timeout: float = 240) -> None:
    try:
        async for msg in stub.GenerateStream(req, timeout=timeout):
            out.tokens += msg.token_ids
            out.text += msg.text
            if msg.finish_reason:
                out.finish = msg.finish_reason
                out.usage = (msg.usage.prompt_tokens, msg.usage.completion_tokens)
    except grpc.aio.AioRpcError as e:
        out.error = f"{e.code().name}: {e.details()}"


def request(rid: str, prompt_ids: list[int], max_new: int, **params: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=rid, token_ids=pb.TokenIds(ids=prompt_ids),
                              parameters=pb.SamplingParameters(max_new_tokens=max_new, ignore_eos=True, **params))


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 2000, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]



async def run_all(
    address: str, reqs: list[pb.GenerateRequest], outs: list[Outcome] | None = None, concurrency: int = 64
) -> list[Outcome]:
    """Stream every request through the router, `concurrency` at a time; `outs` fill in as tokens come."""
    outs = [Outcome() for _ in reqs] if outs is None else outs
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = baton_pb2_grpc.RouterStub(ch)

        async def one(i: int) -> None:
            async with gate:
                await stream(stub, reqs[i], outs[i])

        await asyncio.gather(*(one(i) for i in range(len(reqs))))
    return outs


async def openai_stream(client: openai.AsyncOpenAI, ids: list[int], new_tokens: int, out: Outcome) -> None:
    """Stream a completion of token ids through the `openai` client into `out` (its text; a 0 per chunk)."""
    try:
        chunks = await client.completions.create(model="", prompt=ids, max_tokens=new_tokens, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        async for chunk in chunks:
            out.tokens.append(0)  # a chunk: progress (the text is compared at the end)
            out.text += chunk.choices[0].text
            if chunk.choices[0].finish_reason:
                out.finish = 1
    except openai.APIError as e:
        out.error = f"{type(e).__name__}: {e}"


async def load(http: str, grpc_address: str, new_tokens: int, ids: list[list[int]], fault: Callable[[], None],
               at_tokens: int, retry_until_s: float = 0.0, when: Callable[[], bool] | None = None,
               retried: list[int] | None = None) -> list[Outcome]:
    """Stream every prompt (even ones over gRPC, odd ones over HTTP), and call `fault` once `at_tokens` tokens
    (or chunks) have arrived in all, or once `when` (polled off the event loop) says so. With `retry_until_s`,
    a request that failed is sent again until it succeeds or that many seconds have passed (a client retrying
    after the router died); `retried` collects the indexes of the requests sent again."""
    outs = [Outcome() for _ in ids]
    client = openai.AsyncOpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=240)

    async def one(i: int, stub: baton_pb2_grpc.RouterStub) -> None:
        deadline = time.monotonic() + retry_until_s
        while True:
            if i % 2 == 0:
                await stream(stub, request(f"s{i}", ids[i], new_tokens), outs[i])
            else:
                await openai_stream(client, ids[i], new_tokens, outs[i])
            if outs[i].error is None or time.monotonic() > deadline:
                return
            outs[i] = Outcome()  # start again from nothing
            if retried is not None:
                retried.append(i)
            await asyncio.sleep(0.5)

    async def injector(task: asyncio.Future[Any]) -> None:
        while not (await asyncio.to_thread(when) if when else sum(len(o.tokens) for o in outs) >= at_tokens):
            assert not task.done(), [o.error for o in outs if o.error]
            await asyncio.sleep(0.002)
        fault()

    async with grpc.aio.insecure_channel(grpc_address) as ch:
        stub = baton_pb2_grpc.RouterStub(ch)
        task = asyncio.ensure_future(asyncio.gather(*(one(i, stub) for i in range(len(ids)))))
        await asyncio.gather(injector(task), task)
    await client.close()
    return outs


def check_exact(outs: list[Outcome], ids: list[list[int]], lm: LoadedModel, new_tokens: int) -> None:
    """Every request of `load` completed with exactly what generate() gives alone: tokens and finish reason over
    gRPC, text over HTTP."""
    tok = lm.tokenizer
    assert tok is not None
    for i, (out, prompt) in enumerate(zip(outs, ids)):
        assert out.error is None, f"request {i}: {out.error}"
        ref = reference(lm, prompt, new_tokens)
        if i % 2 == 0:
            assert out.tokens == ref and out.finish == pb.FINISH_REASON_LENGTH, f"gRPC request {i} diverged"
        else:
            assert out.text == tok.decode(ref, skip_special_tokens=True), f"HTTP request {i} diverged"
