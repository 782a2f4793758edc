"""The whole Baton stack in this process, for tests that drive it from outside the way clients do: a decode and a
prefill worker on the tiny Llama (a model each, the weights of the tiny_llama fixture), the real router core,
its gRPC and HTTP APIs, all on one event loop in a background thread, so that blocking clients (grpc, httpx)
call it from the test's thread. Options give it mutual TLS between the services, an API key, small limits, and
a gate that holds prefills."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import uvicorn
from transformers import PreTrainedTokenizerBase

from baton.engine.kv_payload import KVPayload
from baton.engine.request import Request
from baton.engine.runner import ModelRunner
from baton.rpc.server import Service, TlsConfig, create_server
from services.decode.server import decode_service
from services.decode.worker import DecodeWorker
from services.prefill.server import prefill_service
from services.prefill.worker import PrefillWorker
from services.router.core import Router
from services.router.grpc_api import router_service
from services.router.http_api import create_app
from services.router.pool import WorkerPool
from services.router.scheduler import Scheduler
from tests.conftest import TINY_SPEC, make_tiny_llama
from tests.support.processes import free_port

T = TypeVar("T")


class Loop:
    """An event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10) -> T:
        """`fn()` on the loop's thread (where the workers' bookkeeping lives)."""

        async def run() -> T:
            return fn()

        return self.run(run(), timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Options:
    max_batch: int = 4
    max_queue: int = 16
    api_key: str | None = None  # on the router's public APIs
    tls: TlsConfig | None = None  # mutual TLS between router and workers (the public port stays plaintext)
    max_body_bytes: int = 64 << 10
    local_prefill_tokens: int = 0  # the router's --local-prefill-tokens: prompts this short skip the prefill worker
    prefix_cache_bytes: int = 0  # the decode worker's --prefix-cache-bytes


@dataclass
class Stack:
    loop: Loop
    grpc: str  # the router's public gRPC address
    http: str  # the router's HTTP base URL (http://host:port)
    decode_address: str
    prefill_address: str
    decode: DecodeWorker
    prefill: PrefillWorker
    router: Router
    prefill_gate: threading.Event = field(default_factory=threading.Event)  # cleared: prefills wait for it

    def idle(self) -> bool:
        """No request lives anywhere: no decode row or reservation, no prefill queued, nothing in the router."""

        def check() -> bool:
            occ = self.decode.occupancy()
            return occ.active_rows == 0 and self.prefill.occupancy().waiting == 0 and self.router.in_flight == 0

        return self.loop.call(check)

    def wait_idle(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.idle():
            assert time.monotonic() < deadline, f"still busy: {self.loop.call(self.decode.occupancy)}"
            time.sleep(0.02)


@contextlib.contextmanager
def running_stack(tokenizer: PreTrainedTokenizerBase, options: Options | None = None) -> Iterator[Stack]:
    opts = options or Options()
    loop = Loop()
    decode_addr, prefill_addr, router_addr = (f"127.0.0.1:{free_port()}" for _ in range(3))
    http_port = free_port()
    gate = threading.Event()
    gate.set()
    stops: list[Callable[[], Coroutine[Any, Any, Any]]] = []

    async def serve(services: list[Service], address: str, **kw: Any) -> None:
        server, _ = create_server(services, address, **kw)
        await server.start()
        stops.append(lambda: server.stop(0))

    async def start() -> Stack:
        decode = DecodeWorker(make_tiny_llama(tokenizer), max_batch=opts.max_batch,
                              prefix_cache_bytes=opts.prefix_cache_bytes)
        decode.start()
        stops.append(decode.close)
        await serve([decode_service(decode)], decode_addr, tls=opts.tls)
        runner = ModelRunner(make_tiny_llama(tokenizer))

        def gated_prefill(reqs: list[Request]) -> list[KVPayload]:
            gate.wait(30)
            return runner.prefill_many(reqs)

        prefill = PrefillWorker(runner.lm, prefill_fn=gated_prefill, tls=opts.tls)

        async def stop_prefill() -> None:
            gate.set()
            await prefill.close()

        stops.append(stop_prefill)
        await serve([prefill_service(prefill)], prefill_addr, tls=opts.tls)
        pool = WorkerPool(Scheduler(opts.max_queue), [decode_addr], [prefill_addr], poll_s=0.05, tls=opts.tls)
        router = Router(tokenizer, "tiny-llama", TINY_SPEC, pool, local_prefill_tokens=opts.local_prefill_tokens)
        await router.start()
        stops.append(router.close)
        await serve([router_service(router)], router_addr, api_key=opts.api_key,
                    max_message_bytes=opts.max_body_bytes)
        app = create_app(router, max_body_bytes=opts.max_body_bytes, api_key=opts.api_key)
        http = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="warning",
                                             lifespan="off"))
        task = asyncio.ensure_future(http.serve())

        async def stop_http() -> None:
            http.should_exit = True
            await task

        stops.append(stop_http)
        while not http.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        return Stack(loop, router_addr, f"http://127.0.0.1:{http_port}", decode_addr, prefill_addr, decode,
                     prefill, router, gate)

    async def stop() -> None:
        for fn in reversed(stops):
            await fn()

    try:
        yield loop.run(start())
    finally:
        loop.run(stop())
        loop.close()
