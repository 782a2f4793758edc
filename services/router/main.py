"""`baton router`: the public entry. Serves baton.v1.Router over gRPC (with health and reflection) and, when
services/router/http_api.py provides `create_app(router)`, the OpenAI-compatible HTTP API on --http-port, in
the same event loop. Workers are given by address (--decode, --prefill) or found in a Redis registry (--redis).
It loads the model's tokenizer and config only, never the weights.

SIGTERM or SIGINT stops it cleanly: health turns NOT_SERVING, new calls are refused, calls in flight get
--grace-s seconds to finish, and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import logging
import signal
from collections.abc import Iterator
from typing import Any

from baton.cli import add_model_arguments, add_tls_arguments, env_default
from baton.rpc.server import TlsConfig, create_server, set_serving
from services.router.core import Router
from services.router.grpc_api import router_service
from services.router.pool import WorkerPool
from services.router.scheduler import Role, Scheduler

log = logging.getLogger(__name__)


def _addresses(name: str) -> list[str]:
    """Default worker addresses from the environment: BATON_DECODE="host:port,host:port"."""
    return [a for a in (env_default(name, "") or "").replace(" ", ",").split(",") if a]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=env_default("host", "0.0.0.0"), help="address to listen on")
    p.add_argument("--grpc-port", type=int, default=int(env_default("grpc_port", "50051") or 50051))
    p.add_argument("--http-port", type=int, default=int(env_default("http_port", "8000") or 8000),
                   help="OpenAI-compatible HTTP API (0: none)")
    p.add_argument("--decode", nargs="+", action="extend", default=_addresses("decode"), metavar="HOST:PORT",
                   help="decode worker addresses")
    p.add_argument("--prefill", nargs="+", action="extend", default=_addresses("prefill"), metavar="HOST:PORT",
                   help="prefill worker addresses")
    p.add_argument("--redis", default=env_default("redis"), help="redis://host:port to find workers in instead")
    p.add_argument("--poll-s", type=float, default=float(env_default("poll_s", "0.2") or 0.2),
                   help="seconds between reads of the workers' load")
    p.add_argument("--max-queue", type=int, default=int(env_default("max_queue", "256") or 256),
                   help="requests that may wait for a decode worker; more are refused (RESOURCE_EXHAUSTED)")
    p.add_argument("--queue-timeout-s", type=float, default=float(env_default("queue_timeout_s", "30") or 30),
                   help="how long a request waits for a decode worker before it is refused")
    p.add_argument("--kv-timeout-s", type=float, default=float(env_default("kv_timeout_s", "30") or 30),
                   help="how long a decode worker holds a reserved row for the prompt's KV")
    p.add_argument("--max-retries", type=int, default=int(env_default("max_retries", "3") or 3),
                   help="times one request may be resumed or re-prefilled on other workers after a failure")
    p.add_argument("--grace-s", type=float, default=float(env_default("grace_s", "10") or 10),
                   help="on SIGTERM, how long calls in flight may take to finish")
    p.add_argument("--api-key", default=env_default("api_key"),
                   help="require this bearer token on the public API (HTTP Authorization, gRPC authorization "
                        "metadata); /health, /metrics and gRPC health stay open")
    p.add_argument("--max-body-bytes", type=int, default=int(env_default("max_body_bytes", str(4 << 20)) or 4 << 20),
                   help="largest HTTP body (else 413) and gRPC request message (else RESOURCE_EXHAUSTED) accepted")
    add_tls_arguments(p)
    add_model_arguments(p)


def main(args: argparse.Namespace) -> int:
    if not args.redis and not (args.decode and args.prefill):
        log.error("give --decode and --prefill worker addresses, or --redis")
        return 2
    try:
        args.tls = TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_ca)
    except ValueError as e:
        log.error("%s", e)
        return 2
    return asyncio.run(serve(args))


async def _track_readiness(router: Router, health: Any, services: list[Any], poll_s: float) -> None:
    """Health is SERVING only while the router knows a healthy decode worker and a healthy prefill worker, so
    that readiness probes (and `baton serve`) wait for a router that can actually serve."""
    serving: bool | None = None
    while True:
        ready = all(any(w.healthy for w in router.scheduler.loads(role)) for role in Role)
        if ready != serving:
            await set_serving(health, services, ready)
            if serving is not None or not ready:
                log.info("router %s", "ready: workers found" if ready else "not ready: waiting for workers")
            serving = ready
        await asyncio.sleep(poll_s)


async def serve(args: argparse.Namespace) -> int:
    pool = WorkerPool(Scheduler(args.max_queue), args.decode, args.prefill, args.redis, args.poll_s,
                      tls=getattr(args, "tls", None))
    router = Router.load(args.model, pool, kv_timeout_s=args.kv_timeout_s, queue_timeout_s=args.queue_timeout_s,
                         max_retries=args.max_retries)
    await router.start()
    services = [router_service(router)]
    # The public port: plaintext (put a TLS-terminating proxy in front), guarded by --api-key when given.
    server, health = create_server(services, f"{args.host}:{args.grpc_port}", api_key=args.api_key,
                                   max_message_bytes=args.max_body_bytes)
    await server.start()
    readiness = asyncio.create_task(_track_readiness(router, health, services, args.poll_s), name="readiness")
    http = _http_server(router, args) if args.http_port else None
    http_task = asyncio.create_task(http.serve(), name="http") if http is not None else None
    source = f"registry {args.redis}" if args.redis else f"decode {args.decode}, prefill {args.prefill}"
    log.info("router serving gRPC on %s:%d%s, model %s, workers from %s", args.host, args.grpc_port,
             f", HTTP on {args.http_port}" if http is not None else "", args.model, source)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait())}
    if http_task is not None:
        waits.add(http_task)
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if http_task is not None and http_task.done() and not stop.is_set():
        log.error("the HTTP server stopped: %s", http_task.exception() or "no error")

    log.info("stopping: %d requests in flight", router.in_flight)
    readiness.cancel()
    await set_serving(health, services, False)
    if http is not None and http_task is not None:
        http.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http_task, args.grace_s)
    await server.stop(grace=args.grace_s)
    await router.close()
    log.info("router stopped")
    return 0


def _http_server(router: Router, args: argparse.Namespace) -> Any:
    """A uvicorn server for http_api.create_app(router), or None when there is no HTTP API."""
    if importlib.util.find_spec("services.router.http_api") is None:
        log.warning("no services/router/http_api.py: serving gRPC only")
        return None
    http_api = importlib.import_module("services.router.http_api")
    if not hasattr(http_api, "create_app"):
        log.warning("services/router/http_api.py has no create_app(router): serving gRPC only")
        return None
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its own signal handlers: this process handles SIGTERM/SIGINT for both servers."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def install_signal_handlers(self) -> None:  # uvicorn before 0.29
            pass

    app = http_api.create_app(router, max_body_bytes=args.max_body_bytes, api_key=args.api_key)
    return Server(uvicorn.Config(app, host=args.host, port=args.http_port, log_level="warning"))
