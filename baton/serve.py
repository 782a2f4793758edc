"""`baton serve`: the whole stack on one machine, as separate processes.

Starts the decode and prefill workers (each on its own port, with a share of the machine's cores), waits until
each reports SERVING on the gRPC health service, then starts the router, prints where to send requests, and
stops everything on Ctrl-C or SIGTERM (or when any process dies).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from baton.cli import add_model_arguments, env_default


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prefill-workers", type=int, default=int(env_default("prefill_workers", "1") or 1))
    p.add_argument("--decode-workers", type=int, default=int(env_default("decode_workers", "1") or 1))
    p.add_argument("--host", default=env_default("host", "127.0.0.1"), help="address the router listens on")
    p.add_argument("--http-port", type=int, default=int(env_default("http_port", "8000") or 8000))
    p.add_argument("--grpc-port", type=int, default=int(env_default("grpc_port", "50051") or 50051))
    p.add_argument("--max-batch", type=int, default=int(env_default("max_batch", "32") or 32))
    p.add_argument("--policy", default=env_default("policy", "baton"), choices=["baton", "orca", "static"])
    p.add_argument("--redis", default=env_default("redis"), help="use this Redis as the worker registry")
    p.add_argument("--startup-timeout", type=float, default=180.0)


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
    """Block until the gRPC health service at `address` says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process for {address} exited with code {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
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


def main(args: argparse.Namespace) -> int:
    from baton.engine.models import resolve_model_path

    resolve_model_path(args.model)  # convert the embedded model once, before several processes want it
    workers = args.prefill_workers + args.decode_workers
    threads = args.threads or max(1, (os.cpu_count() or 1) // workers)  # workers must not fight over cores
    registry = ["--redis", args.redis] if args.redis else []
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
                                               *model_flags(args, threads), *registry])
            decode.append((addr, proc))
            metrics.append(f"decode-{i} http://127.0.0.1:{metrics_port}/metrics")
        for i in range(args.prefill_workers):
            addr, metrics_port = f"127.0.0.1:{free_port(taken)}", free_port(taken)
            proc = stack.start(f"prefill-{i}", ["prefill", "--host", "127.0.0.1", "--port", addr.split(":")[1],
                                                "--metrics-port", str(metrics_port),
                                                *model_flags(args, threads), *registry])
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
              f"{threads} threads each).\n"
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
