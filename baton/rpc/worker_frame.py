"""The frame both workers run in: listen, health, registry heartbeat, drain, metrics. `baton prefill` and
`baton decode` differ only in the core they put in it (services/{prefill,decode}/worker.py) and its servicer.

A worker's life in the frame:
1. Listen on --host:--port with its services, health and reflection (baton/rpc/server.py), answering only callers
   with the internal token (baton/rpc/internal_token.py); serve /metrics on --metrics-port; report SERVING.
2. With --redis, publish a WorkerInfo under --redis-prefix every --heartbeat-s, and soon after its load changes
   (`core.load_changed`) (baton/rpc/registry.py): its advertised address, model fingerprint and load
   (`core.occupancy()`, baton/rpc/load.py).
3. On SIGTERM or SIGINT: report NOT_SERVING and drain (`core.drain()`: take no new work, finish what was
   accepted) for at most --drain-s; what is still live then is handed off (`core.hand_off()`: its callers are told
   UNAVAILABLE or CANCELLED, and routers place it elsewhere). A core that `keeps_registered_while_draining`
   (decode: its load then shows no free row, and routers keep streaming from it instead of resuming its requests
   elsewhere) stays in the registry until the drain ends; any other leaves it first, so that no router sends it
   more work.
4. Leave the registry, stop the server and the core, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from baton.engine.models import LoadedModel, load_model
from baton.errors import InvalidRequestError
from baton.metrics import MetricsRegistry, serve_metrics
from baton.rpc.internal_token import resolve_internal_token
from baton.rpc.load import Load, Role
from baton.rpc.registry import RedisRegistry, WorkerInfo, heartbeat
from baton.rpc.server import Service, TlsConfig, advertised_address, create_server, set_serving
from baton.shared_cores import SharedCores

log = logging.getLogger(__name__)


class WorkerCore(Protocol):
    """What the frame needs of a worker's core."""

    role: Role
    keeps_registered_while_draining: bool

    @property
    def fingerprint(self) -> str: ...  # of the model it serves
    @property
    def metrics(self) -> MetricsRegistry: ...
    def occupancy(self) -> Load: ...
    @property
    def load_changed(self) -> asyncio.Event | None: ...  # set when its load changes: published soon (registry.py)
    def describe(self) -> str: ...  # for the start-up log line
    async def drain(self) -> None: ...  # take no new work; return once nothing accepted is live
    def hand_off(self) -> int: ...  # end what is still live (its routers place it elsewhere); how many
    async def close(self) -> None: ...


@dataclass
class WorkerSetup:
    """What every worker is made of, from the flags both take (baton/flags.py: add_worker_arguments)."""

    lm: LoadedModel  # --model, --device, --dtype
    tls: TlsConfig | None  # --tls-cert, --tls-key, --tls-ca
    internal_token: str  # --internal-token, --internal-token-file: callers must present it
    shared_cores: SharedCores | None  # --shared-cores


def load_worker_model(args: argparse.Namespace) -> WorkerSetup | int:
    """The worker's model, TLS files, internal token and shared cores, or exit code 2 naming the problem."""
    try:
        tls = TlsConfig.from_files(args.tls_cert, args.tls_key, args.tls_ca)
        token = resolve_internal_token(args.internal_token, args.internal_token_file)
        lm = load_model(args.model, device=args.device, dtype=args.dtype, cpu_gemm=args.cpu_gemm,
                        cpu_attention=args.cpu_attention)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("model %s loaded on %s (%s), fingerprint %s", args.model, lm.device, lm.dtype, lm.fingerprint[:12])
    if lm.tokenizer is not None:  # structured output's view of the tokenizer, now rather than on the event loop
        try:
            lm.grammars.tokenizer  # noqa: B018 - about a second, once
        except InvalidRequestError as e:
            log.warning("%s: requests with a response_format will be refused", e)
    return WorkerSetup(lm, tls, token, SharedCores(args.shared_cores) if args.shared_cores else None)


async def _stop_heartbeat(beat: asyncio.Task[None] | None, stop: asyncio.Event) -> None:
    """Stop the heartbeat; it removes the worker's record as it ends."""
    stop.set()
    if beat is not None:
        with contextlib.suppress(Exception):
            await beat


async def run_worker(core: WorkerCore, services: Sequence[Service], args: argparse.Namespace,
                     setup: WorkerSetup, on_signal: Callable[[Callable[[], None]], None] | None = None) -> int:
    """Serve `core` through `services` until SIGTERM or SIGINT, then drain; returns the exit code. Callers
    must present the internal token (and a certificate, with TLS). `on_signal`: where this event loop does not
    run on the main thread (main_thread.py), how to hear of the signals, which only the main thread receives."""
    role = core.role.value
    listen = f"{args.host}:{args.port}"
    try:
        server, health = create_server(services, listen, tls=setup.tls, internal_token=setup.internal_token)
    except RuntimeError as e:
        log.error("cannot listen on %s: %s", listen, e)
        await core.close()
        return 1
    await server.start()
    metrics = serve_metrics(core.metrics, args.host, args.metrics_port)
    await set_serving(health, services, True)
    address = advertised_address(args.host, args.port, args.advertise)
    log.info("%s worker serving on %s (advertised %s): %s", role, listen, address, core.describe())

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    if on_signal is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    else:
        def stop_soon() -> None:
            loop.call_soon_threadsafe(stop.set)

        on_signal(stop_soon)

    registry = RedisRegistry(args.redis, prefix=args.redis_prefix) if args.redis else None
    beat_stop = asyncio.Event()
    beat: asyncio.Task[None] | None = None
    if registry is not None:

        def info() -> WorkerInfo:
            return WorkerInfo(role, address, core.fingerprint, core.occupancy().to_registry())

        beat = asyncio.create_task(heartbeat(registry, info, args.heartbeat_s, beat_stop, changed=core.load_changed),
                                   name="heartbeat")

    await stop.wait()
    log.info("draining: %s (at most %gs)", core.occupancy(), args.drain_s)
    await set_serving(health, services, False)
    if not core.keeps_registered_while_draining:
        await _stop_heartbeat(beat, beat_stop)
    try:
        await asyncio.wait_for(core.drain(), args.drain_s)
    except asyncio.TimeoutError:
        log.warning("drain timed out after %gs: handing off %d live requests", args.drain_s, core.hand_off())
    await _stop_heartbeat(beat, beat_stop)
    await server.stop(grace=2.0)
    await core.close()
    if registry is not None:
        with contextlib.suppress(Exception):
            await registry.close()
    if metrics is not None:
        metrics.stop()
    log.info("%s worker stopped: %s", role, core.occupancy())
    return 0
