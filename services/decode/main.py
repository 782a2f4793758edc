"""`baton decode`: a decode worker. Loads the model, runs the decode loop in its own thread and serves
baton.v1.DecodeWorker (with health and reflection) over gRPC; with --redis it registers itself for routers.

SIGTERM or SIGINT drains it: health turns NOT_SERVING, it reports no free row (routers stop sending it work),
new requests are refused and running requests finish; those still running after --drain-s are handed off (their
streams end UNAVAILABLE and routers resume them on other workers). Then the registry entry goes and the process
exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from baton.cli import add_worker_arguments, flag
from baton.engine.engine import POLICIES
from baton.engine.models import load_model
from baton.metrics import DECODE_METRICS_PORT, serve_metrics
from baton.rpc.server import TlsConfig, advertised_address, create_server, set_serving
from baton.shared_cores import SharedCores
from services.decode.server import decode_service
from services.decode.worker import DEFAULT_KV_TIMEOUT_S, DecodeWorker

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p, port=50061, metrics_port=DECODE_METRICS_PORT, drain_s=60.0,
                         drain_help="on SIGTERM, seconds live requests may take before they are handed off")
    flag(p, "--max-batch", 32, int, help="rows of the decode batch")
    flag(p, "--max-kv-tokens", 0, int,
         help="KV tokens the worker may promise (0: max-batch x min(model context, 2048))")
    flag(p, "--policy", "baton", choices=POLICIES,
         help="baton splices prefilled KV; orca and static recompute the prompt here")
    flag(p, "--kv-timeout-s", DEFAULT_KV_TIMEOUT_S, float,
         help="how long a reservation waits for its KV when the request does not say")


def main(args: argparse.Namespace) -> int:
    try:
        args.tls = TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_ca)
    except ValueError as e:
        log.error("%s", e)
        return 2
    lm = load_model(args.model, args.device, args.dtype)
    log.info("model %s loaded on %s (%s), fingerprint %s", args.model, lm.device, lm.dtype, lm.fingerprint[:12])
    cores = SharedCores(args.shared_cores) if args.shared_cores else None
    worker = DecodeWorker(lm, args.policy, args.max_batch, args.max_kv_tokens or None, args.kv_timeout_s, cores)
    return asyncio.run(serve(worker, args))


async def serve(worker: DecodeWorker, args: argparse.Namespace) -> int:
    worker.start()
    services = [decode_service(worker)]
    server, health = create_server(services, f"{args.host}:{args.port}", tls=getattr(args, "tls", None))
    await server.start()
    metrics = serve_metrics(worker.metrics, args.host, args.metrics_port)
    await set_serving(health, services, True)
    address = advertised_address(args.host, args.port, args.advertise)
    log.info(
        "decode worker serving on %s:%d (advertised %s), policy %s, %d rows, %d KV tokens",
        args.host,
        args.port,
        address,
        args.policy,
        worker.max_batch,
        worker.max_kv_tokens,
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
    # While draining the heartbeat goes on, reporting no free row: routers stop sending requests here but do not
    # take the worker for dead (which would make them resume its running requests elsewhere at once).
    try:
        await asyncio.wait_for(worker.drain(), args.drain_s)
    except asyncio.TimeoutError:
        # The rest are handed off: their Decode streams end UNAVAILABLE and each router resumes them on another
        # decode worker from the tokens already streamed, so no client sees the shutdown.
        log.warning("drain timed out after %.0fs: handing off %d live requests", args.drain_s, worker.hand_off())
    if beat is not None:
        beat_stop.set()  # the heartbeat removes this worker from the registry as it stops
        with contextlib.suppress(Exception):
            await beat
        with contextlib.suppress(Exception):
            await registry.close()
    await server.stop(grace=2.0)
    await worker.close()
    if metrics is not None:
        metrics.stop()
    log.info("decode worker stopped")
    return 0
