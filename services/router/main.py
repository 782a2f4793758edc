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
import logging
import signal
from collections.abc import Iterator
from typing import Any

from baton.flags import (
    add_internal_token_arguments,
    add_model_arguments,
    add_registry_arguments,
    add_tls_arguments,
    addresses_from_env,
    flag,
)
from baton.rpc.internal_token import resolve_internal_token
from baton.rpc.load import Role
from baton.rpc.server import TlsConfig, create_server, set_serving
from services.router.core import Router
from services.router.grpc_api import router_service
from services.router.pool import WorkerPool
from services.router.scheduler import Scheduler
from services.router.served import names_from_env

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--host", "0.0.0.0", help="address to listen on")
    flag(p, "--grpc-port", 50051, int, help="public gRPC API")
    flag(p, "--http-port", 8000, int, help="OpenAI-compatible HTTP API and /metrics (0: none)")
    p.add_argument("--decode", nargs="+", action="extend", default=addresses_from_env("decode"), metavar="HOST:PORT",
                   help="decode worker addresses")
    p.add_argument("--prefill", nargs="+", action="extend", default=addresses_from_env("prefill"), metavar="HOST:PORT",
                   help="prefill worker addresses")
    add_registry_arguments(p)  # --redis: find workers there instead
    flag(p, "--poll-s", 0.2, float, help="seconds between reads of the workers' load")
    flag(p, "--max-queue", 256, int,
         help="requests that may wait for a decode worker; more are refused (RESOURCE_EXHAUSTED)")
    flag(p, "--queue-timeout-s", 0.0, float,
         help="how long a queued request waits for a decode worker before it is refused (0: until its deadline)")
    flag(p, "--kv-timeout-s", 30.0, float, help="how long a decode worker holds a reserved row for the prompt's KV")
    flag(p, "--local-prefill-tokens", 0, int,
         help="a request with at most this many tokens to prefill is prefilled by its decode worker, inside its "
              "batch's iteration, and no KV travels (0: every prompt goes through a prefill worker). Worth it "
              "where prefill and decode share the cores (baton serve on a CPU sets it)")
    flag(p, "--max-retries", 3, int,
         help="times one request may be resumed or re-prefilled on other workers after a failure")
    flag(p, "--grace-s", 10.0, float, help="on SIGTERM, how long calls in flight may take to finish")
    flag(p, "--api-key", help="require this bearer token on the public API (HTTP Authorization, gRPC "
                              "authorization metadata); /health, /metrics and gRPC health stay open")
    flag(p, "--max-body-bytes", 4 << 20, int,
         help="largest HTTP body (else 413) and gRPC request message (else RESOURCE_EXHAUSTED) accepted")
    flag(p, "--read-timeout-s", 30.0, float,
         help="how long an HTTP client may take to send a whole request, headers and body (else 408 and the "
              "connection is closed; answering is not bounded; 0: no limit)")
    add_tls_arguments(p)
    add_internal_token_arguments(p)  # what calls to the workers carry
    add_model_arguments(p)
    p.add_argument("--served-model-name", nargs="+", default=names_from_env(), metavar="NAME",
                   help="the names clients may give as `model` (the first is the one responses report); others are "
                        "refused (HTTP 404 model_not_found, gRPC NOT_FOUND). Default: --model as given and, for a "
                        "local model, its directory's name. Env: BATON_SERVED_MODEL_NAME=name,name")


def main(args: argparse.Namespace) -> int:
    if not args.redis and not (args.decode and args.prefill):
        log.error("give --decode and --prefill worker addresses, or --redis")
        return 2
    try:
        args.tls = TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_ca)
        args.internal_token = resolve_internal_token(args.internal_token, args.internal_token_file)
    except ValueError as e:
        log.error("%s", e)
        return 2
    return asyncio.run(serve(args))


async def _track_readiness(router: Router, health: Any, services: list[Any], poll_s: float) -> None:
    """Health is SERVING only while the router knows a healthy decode worker and a healthy prefill worker, so
    that readiness probes (and `baton serve`) wait for a router that can actually serve."""
    serving: bool | None = None
    while True:
        ready = all(any(w.healthy for w in router.scheduler.reports(role)) for role in Role)
        if ready != serving:
            await set_serving(health, services, ready)
            if serving is not None or not ready:
                log.info("router %s", "ready: workers found" if ready else "not ready: waiting for workers")
            serving = ready
        await asyncio.sleep(poll_s)


async def serve(args: argparse.Namespace) -> int:
    pool = WorkerPool(Scheduler(args.max_queue), args.decode, args.prefill, args.redis, args.poll_s,
                      redis_prefix=args.redis_prefix, tls=getattr(args, "tls", None),
                      internal_token=getattr(args, "internal_token", None))
    router = Router.load(args.model, pool, kv_timeout_s=args.kv_timeout_s, queue_timeout_s=args.queue_timeout_s or None,
                         max_retries=args.max_retries, served_names=args.served_model_name,
                         local_prefill_tokens=args.local_prefill_tokens)
    await router.start()
    services = [router_service(router)]
    # The public port: plaintext (put a TLS-terminating proxy in front), guarded by --api-key when given.
    server, health = create_server(services, f"{args.host}:{args.grpc_port}", api_key=args.api_key,
                                   max_message_bytes=args.max_body_bytes)
    await server.start()
    readiness = asyncio.create_task(_track_readiness(router, health, services, args.poll_s), name="readiness")
    http = _http_server(router, args) if args.http_port else None
    http_task = asyncio.create_task(http.serve(), name="http") if http is not None else None
    source = (f"registry {args.redis} (prefix {args.redis_prefix})" if args.redis
              else f"decode {args.decode}, prefill {args.prefill}")
    log.info("router serving gRPC on %s:%d%s, model %s (served as %s), workers from %s", args.host, args.grpc_port,
             f", HTTP on {args.http_port}" if http is not None else "", args.model, ", ".join(router.served.names),
             source)

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
    """A uvicorn server for the OpenAI-compatible HTTP API (services/router/http_api.py)."""
    import uvicorn

    from services.router import http_api
    from services.router.http_timeouts import read_timeout_protocol

    class Server(uvicorn.Server):
        """uvicorn without its own signal handlers: this process handles SIGTERM/SIGINT for both servers."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        def install_signal_handlers(self) -> None:  # uvicorn before 0.29
            pass

    app = http_api.create_app(router, max_body_bytes=args.max_body_bytes, api_key=args.api_key)
    # Slow clients: each request must arrive within --read-timeout-s (services/router/http_timeouts.py).
    http = read_timeout_protocol(args.read_timeout_s) if args.read_timeout_s > 0 else "auto"
    return Server(uvicorn.Config(app, host=args.host, port=args.http_port, log_level="warning", http=http))
