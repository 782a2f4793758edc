"""`baton decode`: a decode worker. Loads the model, runs the decode loop in its own thread and serves
baton.v1.DecodeWorker (with health and reflection) over gRPC; with --redis it registers itself for routers.

SIGTERM or SIGINT drains it: health turns NOT_SERVING, the registry entry goes, new requests are refused,
running requests finish, and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket

from baton.cli import add_model_arguments, env_default
from baton.engine.engine import POLICIES
from baton.engine.models import load_model
from baton.rpc.server import create_server, set_serving
from services.decode.server import decode_service
from services.decode.worker import DEFAULT_KV_TIMEOUT_S, DecodeWorker

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=env_default("host", "0.0.0.0"), help="address to listen on")
    p.add_argument("--port", type=int, default=int(env_default("port", "50061") or 50061))
    p.add_argument(
        "--advertise",
        default=env_default("advertise"),
        help="host:port other services dial (default: this machine's name and --port)",
    )
    p.add_argument("--max-batch", type=int, default=int(env_default("max_batch", "32") or 32),
                   help="rows of the decode batch")
    p.add_argument("--max-kv-tokens", type=int, default=int(env_default("max_kv_tokens", "0") or 0),
                   help="KV tokens the worker may promise (0: max-batch x min(model context, 2048))")
    p.add_argument("--policy", choices=POLICIES, default=env_default("policy", "baton"),
                   help="baton splices prefilled KV; orca and static recompute the prompt here")
    p.add_argument("--kv-timeout-s", type=float,
                   default=float(env_default("kv_timeout_s", str(DEFAULT_KV_TIMEOUT_S)) or DEFAULT_KV_TIMEOUT_S),
                   help="how long a reservation waits for its KV when the request does not say")
    p.add_argument("--redis", default=env_default("redis"), help="redis://host:port to register with")
    p.add_argument("--heartbeat-s", type=float, default=float(env_default("heartbeat_s", "1.0") or 1.0),
                   help="seconds between registry heartbeats")
    add_model_arguments(p)


def advertised_address(args: argparse.Namespace) -> str:
    if args.advertise:
        return str(args.advertise)
    host = args.host if args.host not in ("0.0.0.0", "::", "[::]", "") else socket.gethostname()
    return f"{host}:{args.port}"


def main(args: argparse.Namespace) -> int:
    lm = load_model(args.model, args.device, args.dtype)
    log.info("model %s loaded on %s (%s), fingerprint %s", args.model, lm.device, lm.dtype, lm.fingerprint[:12])
    worker = DecodeWorker(lm, args.policy, args.max_batch, args.max_kv_tokens or None, args.kv_timeout_s)
    return asyncio.run(serve(worker, args))


async def serve(worker: DecodeWorker, args: argparse.Namespace) -> int:
    worker.start()
    services = [decode_service(worker)]
    server, health = create_server(services, f"{args.host}:{args.port}")
    await server.start()
    await set_serving(health, services, True)
    address = advertised_address(args)
    log.info(
        "decode worker serving on %s:%d (advertised %s), policy %s, %d rows, %d KV tokens",
        args.host, args.port, address, args.policy, worker.max_batch, worker.max_kv_tokens,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    beat_stop = asyncio.Event()
    beat: asyncio.Task[None] | None = None
    if args.redis:
        from baton.rpc.registry import RedisRegistry, WorkerInfo, heartbeat

        registry = RedisRegistry(args.redis)

        def info() -> WorkerInfo:
            return WorkerInfo("decode", address, worker.lm.fingerprint, worker.occupancy().counts())

        beat = asyncio.create_task(heartbeat(registry, info, args.heartbeat_s, beat_stop))

    await stop.wait()
    log.info("draining: %d live requests", worker.occupancy().active_rows)
    await set_serving(health, services, False)
    if beat is not None:
        beat_stop.set()  # the heartbeat removes this worker from the registry as it stops
        with contextlib.suppress(Exception):
            await beat
        with contextlib.suppress(Exception):
            await registry.close()
    await worker.drain()
    await server.stop(grace=2.0)
    await worker.close()
    log.info("decode worker stopped")
    return 0
