"""`baton serve`: the whole stack on one machine, as separate processes.

Starts the decode and prefill workers (each on its own port), waits until each reports SERVING on the gRPC
health service, then starts the router, prints where to send requests, and stops everything on Ctrl-C or
SIGTERM (or when any process dies). When the model runs on the CPU the workers take turns on every core, prefills
first (baton/shared_cores.py); otherwise each gets a share of the cores for its host-side work.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from baton.flags import add_model_arguments, add_registry_arguments, env_default, flag


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    flag(p, "--prefill-workers", 1, int, help="prefill worker processes")
    flag(p, "--decode-workers", 1, int, help="decode worker processes")
    flag(p, "--host", "127.0.0.1", help="address the router listens on")
    flag(p, "--http-port", 8000, int, help="OpenAI-compatible HTTP API")
    flag(p, "--grpc-port", 50051, int, help="gRPC API")
    flag(p, "--max-batch", 32, int, help="rows of each decode worker's batch")
    flag(p, "--shared-cores", "auto", choices=["auto", "on", "off"],
         help="workers take turns on every CPU core, prefills first, instead of splitting the cores between them "
              "(auto: on when the model runs on the CPU)")
    flag(p, "--policy", "baton", choices=["baton", "orca", "static"], help="decode workers' engine policy")
    add_registry_arguments(p)  # without --redis, the router is given the workers' addresses
    flag(p, "--startup-timeout", 180.0, float, help="seconds every service has to become healthy")


def free_port(taken: set[int] | None = None) -> int:
    """A port free now; with `taken`, also not in it (and added to it), so that ports handed out are distinct."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if taken is None or port not in taken:
            if taken is not None:
                taken.add(port)
            return port


def wait_serving(address: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Block until the gRPC health service at `address` says SERVING (over mutual TLS when BATON_TLS_* are set:
    the services started here read the same variables)."""
    from baton.health import is_serving
    from baton.rpc.server import TlsConfig

    tls = TlsConfig.from_files(env_default("tls_cert"), env_default("tls_key"), env_default("tls_ca"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process for {address} exited with code {proc.returncode}")
        if is_serving(address, 1.0, tls):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} did not become healthy within {timeout:.0f} s")


@dataclass
class Stack:
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "baton.cli", *argv])
        self.procs.append((name, proc))
        return proc

    def dead(self) -> str | None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                return f"{name} exited with code {proc.returncode}"
        return None

    def stop(self, grace_s: float = 30.0) -> None:
        for _, proc in reversed(self.procs):  # router first, so no new work reaches the workers
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


def model_flags(args: argparse.Namespace, threads: int) -> list[str]:
    flags = ["--model", args.model, "--threads", str(threads)]
    if args.device:
        flags += ["--device", args.device]
    if args.dtype:
        flags += ["--dtype", args.dtype]
    return flags


def runs_on_cpu(device: str | None) -> bool:
    if device:
        return device == "cpu"
    import torch

    return not torch.cuda.is_available()


def main(args: argparse.Namespace) -> int:
    from baton.engine.models import resolve_model_path

    resolve_model_path(args.model)  # convert the embedded model once, before several processes want it
    workers = args.prefill_workers + args.decode_workers
    cores = os.cpu_count() or 1
    lock_dir = None
    shared: list[str] = []
    if args.shared_cores == "on" or (args.shared_cores == "auto" and runs_on_cpu(args.device)):
        lock_dir = tempfile.TemporaryDirectory(prefix="baton-serve-")
        shared = ["--shared-cores", os.path.join(lock_dir.name, "cores")]
        threads = args.threads or cores  # one forward pass at a time: each may use every core
    else:
        threads = args.threads or max(1, cores // workers)  # side by side: workers must not fight over cores
    registry = ["--redis", args.redis, "--redis-prefix", args.redis_prefix] if args.redis else []
    stack = Stack()
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        decode, prefill = [], []
        metrics: list[str] = []  # each worker's /metrics URL
        taken = {args.http_port, args.grpc_port}
        for i in range(args.decode_workers):
            addr, metrics_port = f"127.0.0.1:{free_port(taken)}", free_port(taken)
            proc = stack.start(f"decode-{i}", ["decode", "--host", "127.0.0.1", "--port", addr.split(":")[1],
                                               "--metrics-port", str(metrics_port),
                                               "--max-batch", str(args.max_batch), "--policy", args.policy,
                                               *model_flags(args, threads), *registry, *shared])
            decode.append((addr, proc))
            metrics.append(f"decode-{i} http://127.0.0.1:{metrics_port}/metrics")
        for i in range(args.prefill_workers):
            addr, metrics_port = f"127.0.0.1:{free_port(taken)}", free_port(taken)
            proc = stack.start(f"prefill-{i}", ["prefill", "--host", "127.0.0.1", "--port", addr.split(":")[1],
                                                "--metrics-port", str(metrics_port),
                                                *model_flags(args, threads), *registry, *shared])
            prefill.append((addr, proc))
            metrics.append(f"prefill-{i} http://127.0.0.1:{metrics_port}/metrics")
        for addr, proc in decode + prefill:
            wait_serving(addr, proc, args.startup_timeout)
        router_argv = ["router", "--host", args.host, "--grpc-port", str(args.grpc_port),
                       "--http-port", str(args.http_port), "--model", args.model, *registry]
        if not args.redis:
            router_argv += ["--decode", *(a for a, _ in decode), "--prefill", *(a for a, _ in prefill)]
        router = stack.start("router", router_argv)
        wait_serving(f"127.0.0.1:{args.grpc_port}", router, args.startup_timeout)
        host = "localhost" if args.host in ("0.0.0.0", "127.0.0.1") else args.host
        print(f"Baton is ready ({args.decode_workers} decode, {args.prefill_workers} prefill workers, "
              f"{threads} threads each{', taking turns on the cores' if shared else ''}).\n"
              f"  OpenAI API: http://{host}:{args.http_port}/v1   (e.g. curl http://{host}:{args.http_port}/v1/models)\n"
              f"  gRPC:       {host}:{args.grpc_port}   (baton generate --url {host}:{args.grpc_port} \"Hello\")\n"
              f"  Metrics:    router http://{host}:{args.http_port}/metrics\n"
              + "".join(f"              {m}\n" for m in metrics) +
              "Ctrl-C stops everything.", flush=True)
        while not stopping:
            problem = stack.dead()
            if problem:
                print(f"baton serve: {problem}; stopping", file=sys.stderr)
                return 1
            time.sleep(0.5)
        return 0
    except (RuntimeError, TimeoutError) as e:
        print(f"baton serve: {e}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        if lock_dir is not None:
            lock_dir.cleanup()
