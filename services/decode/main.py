"""`baton decode`: a decode worker. Loads the model, runs the decode loop in its own thread and serves
baton.v1.DecodeWorker in the worker frame (baton/rpc/worker_frame.py: health, registry, metrics, drain).

SIGTERM or SIGINT drains it: health turns NOT_SERVING, it reports no free row (routers stop sending it work),
new requests are refused and running requests finish; those still running after --drain-s are handed off (their
streams end UNAVAILABLE and routers resume them on other workers). Then the registry entry goes and the process
exits 0.
"""

from __future__ import annotations

import argparse

from baton.engine.engine import POLICIES
from baton.engine.prefix_cache import DEFAULT_MAX_BYTES, PREFIX_CACHE_HELP
from baton.engine.slab_pool import RESERVE_HELP
from baton.flags import add_worker_arguments, count_or_auto, flag
from baton.metrics import DECODE_METRICS_PORT
from baton.rpc.main_thread import MainThread
from baton.rpc.worker_frame import WorkerSetup, load_worker_model, run_worker
from services.decode.server import decode_service
from services.decode.worker import DEFAULT_KV_TIMEOUT_S, MAX_KV_TIMEOUT_S, DecodeWorker


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_worker_arguments(p, port=50061, metrics_port=DECODE_METRICS_PORT, drain_s=60.0,
                         drain_help="on SIGTERM, seconds live requests may take before they are handed off")
    flag(p, "--max-batch", 32, int, help="rows of the decode batch")
    flag(p, "--prefix-cache-bytes", DEFAULT_MAX_BYTES, int,
         help=PREFIX_CACHE_HELP + "; here for the prompts this worker prefills itself, and a finished request's KV "
              "stays for its conversation's next turn")
    flag(p, "--max-kv-tokens", 0, int,
         help="KV tokens the worker may promise (0: max-batch x min(model context, 2048))")
    flag(p, "--kv-reserve-bytes", "auto", count_or_auto("bytes"), help=RESERVE_HELP)
    flag(p, "--policy", "baton", choices=POLICIES,
         help="baton splices prefilled KV; orca, padded and static recompute the prompt here")
    flag(p, "--kv-timeout-s", DEFAULT_KV_TIMEOUT_S, float,
         help="how long a reservation waits for its KV when the request does not say")
    flag(p, "--max-kv-timeout-s", MAX_KV_TIMEOUT_S, float,
         help="the longest KV lease a reservation gets, whatever its request asks (longer asks are cut to it)")


def main(args: argparse.Namespace) -> int:
    setup = load_worker_model(args)
    if isinstance(setup, int):
        return setup
    main_thread = MainThread()  # the decode loop gets the main thread, asyncio another (main_thread.py)
    worker = DecodeWorker(setup.lm, args.policy, args.max_batch, args.max_kv_tokens or None, args.kv_timeout_s,
                          setup.shared_cores, args.max_kv_timeout_s, spawn=main_thread.spawn,
                          prefix_cache_bytes=args.prefix_cache_bytes,
                          kv_reserve_bytes=None if args.kv_reserve_bytes == "auto" else args.kv_reserve_bytes)
    return main_thread.run(lambda: serve(worker, args, setup, main_thread))


async def serve(worker: DecodeWorker, args: argparse.Namespace, setup: WorkerSetup, main_thread: MainThread) -> int:
    worker.start()  # on the event loop that serves it
    return await run_worker(worker, [decode_service(worker)], args, setup, main_thread.on_signal)
