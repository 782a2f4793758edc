"""`baton prefill`: a prefill worker. Loads the model, computes prompts' KV in its own thread and serves
baton.v1.PrefillWorker in the worker frame (baton/rpc/worker_frame.py: health, registry, metrics, drain).

On SIGTERM or SIGINT it reports NOT_SERVING, leaves the registry, takes no new work, finishes the prefills it
has accepted and pushes their KV (for at most --drain-s; what is left then is cancelled) and exits 0. It pushes KV
only to the decode workers it knows (--decode, or the registry: services/prefill/destinations.py).
"""

from __future__ import annotations

import argparse
import logging

from baton.engine.prefix_cache import DEFAULT_MAX_BYTES, PREFIX_CACHE_HELP
from baton.flags import add_worker_arguments, addresses_from_env, flag
from baton.metrics import PREFILL_METRICS_PORT
from baton.rpc.main_thread import MainThread
from baton.rpc.registry import TTL_FACTOR, RedisRegistry
from baton.rpc.worker_frame import load_worker_model, run_worker
from services.prefill.destinations import DecodeDirectory
from services.prefill.server import prefill_service
from services.prefill.worker import PrefillWorker

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p, port=50071, metrics_port=PREFILL_METRICS_PORT, drain_s=30.0,
                         drain_help="on SIGTERM, seconds allowed for accepted prefills to finish")
    flag(p, "--max-queue", 1024, int, help="queued prefills beyond which new ones are refused (RESOURCE_EXHAUSTED)")
    flag(p, "--push-timeout-s", 60.0, float, help="seconds allowed for shipping one KV payload to a decode worker")
    flag(p, "--prefix-cache-bytes", DEFAULT_MAX_BYTES, int, help=PREFIX_CACHE_HELP)
    p.add_argument("--decode", nargs="+", action="extend", default=addresses_from_env("decode"), metavar="HOST:PORT",
                   help="decode workers KV may be pushed to (BATON_DECODE; with --redis, also those registered)")


def main(args: argparse.Namespace) -> int:
    if not args.decode and not args.redis:
        log.error("give --decode addresses (the decode workers KV may go to), or --redis")
        return 2
    setup = load_worker_model(args)
    if isinstance(setup, int):
        return setup
    registry = RedisRegistry(args.redis, prefix=args.redis_prefix) if args.redis else None
    destinations = DecodeDirectory(args.decode, registry, patience_s=args.heartbeat_s * TTL_FACTOR)
    main_thread = MainThread()  # the compute loop gets the main thread, asyncio another (main_thread.py)
    worker = PrefillWorker(setup.lm, max_queue=args.max_queue, shared_cores=setup.shared_cores,
                           push_timeout_s=args.push_timeout_s, tls=setup.tls, internal_token=setup.internal_token,
                           destinations=destinations, spawn=main_thread.spawn,
                           prefix_cache_bytes=args.prefix_cache_bytes)
    return main_thread.run(lambda: run_worker(worker, [prefill_service(worker)], args, setup, main_thread.on_signal))
