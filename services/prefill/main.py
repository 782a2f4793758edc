"""`baton prefill`: run a prefill worker.

It serves baton.v1.PrefillWorker (plus gRPC health and reflection) and, with --redis, publishes itself to the
worker registry every --heartbeat-s. On SIGTERM or SIGINT it reports NOT_SERVING, takes no new work, finishes
the prefills it has accepted (for at most --drain-s) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from baton.cli import add_worker_arguments, flag
from baton.engine.models import LoadedModel, load_model
from baton.metrics import PREFILL_METRICS_PORT, serve_metrics
from baton.rpc.registry import RedisRegistry, WorkerInfo, heartbeat, occupancy_dict
from baton.rpc.server import Service, TlsConfig, advertised_address, create_server, set_serving
from baton.shared_cores import SharedCores
from baton.v1 import baton_pb2_grpc
from services.prefill.server import SERVICE_NAME, PrefillWorkerServicer
from services.prefill.worker import PrefillWorker

log = logging.getLogger("baton.prefill")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p, port=50071, metrics_port=PREFILL_METRICS_PORT, drain_s=30.0,
                         drain_help="on SIGTERM, seconds allowed for accepted prefills to finish")
    flag(p, "--redis-prefix", "baton", help="registry key prefix")
    flag(p, "--max-queue", 1024, int, help="queued prefills beyond which new ones are refused (RESOURCE_EXHAUSTED)")
    flag(p, "--push-timeout-s", 60.0, float, help="seconds allowed for shipping one KV payload to a decode worker")


async def serve(lm: LoadedModel, args: argparse.Namespace) -> int:
    cores = SharedCores(args.shared_cores) if args.shared_cores else None
    worker = PrefillWorker(lm, max_queue=args.max_queue, shared_cores=cores)
    tls = getattr(args, "tls", None)
    servicer = PrefillWorkerServicer(worker, push_timeout_s=args.push_timeout_s, tls=tls)
    services = [Service(servicer, baton_pb2_grpc.add_PrefillWorkerServicer_to_server, SERVICE_NAME)]
    listen = f"{args.host}:{args.port}"
    try:
        server, health = create_server(services, listen, tls=tls)
    except RuntimeError as e:
        log.error("cannot listen on %s: %s", listen, e)
        worker.shutdown()
        return 1
    address = advertised_address(args.host, args.port, args.advertise)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    await server.start()
    metrics = serve_metrics(worker.metrics, args.host, args.metrics_port)
    await set_serving(health, services, True)
    log.info("prefill worker serving %s (%s) on %s, advertised as %s", lm.name, lm.fingerprint[:12], listen, address)

    registry: RedisRegistry | None = None
    stop_heartbeat = asyncio.Event()
    beats: asyncio.Task[None] | None = None
    if args.redis:
        registry = RedisRegistry(args.redis, prefix=args.redis_prefix)

        def make_info() -> WorkerInfo:
            return WorkerInfo("prefill", address, lm.fingerprint, occupancy_dict(servicer.occupancy()))

        beats = asyncio.create_task(heartbeat(registry, make_info, args.heartbeat_s, stop_heartbeat))

    await stop.wait()
    log.info("shutting down: finishing %d accepted prefills (at most %.0fs)", servicer.in_flight, args.drain_s)
    await set_serving(health, services, False)
    worker.close_intake()
    if beats is not None:
        stop_heartbeat.set()
        await beats  # removes this worker from the registry
    # Still serving while it drains, so late callers get a clear UNAVAILABLE ("shutting down") to retry elsewhere.
    deadline = loop.time() + args.drain_s
    while servicer.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if servicer.in_flight:
        log.warning("drain timed out: cancelling %d prefills", servicer.in_flight)
    await server.stop(grace=1.0)
    worker.shutdown()
    await servicer.close()
    if registry is not None:
        await registry.close()
    if metrics is not None:
        metrics.stop()
    log.info("stopped: %d prefills shipped", servicer.stats.shipped)
    return 0


def main(args: argparse.Namespace) -> int:
    try:
        args.tls = TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_ca)
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    return asyncio.run(serve(lm, args))
