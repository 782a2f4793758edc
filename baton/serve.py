"""`baton serve`: the whole stack on one machine, as separate processes, supervised.

Starts the decode and prefill workers (each on its own port), waits until each reports SERVING on the gRPC
health service, then starts the router and prints where to send requests. When the model runs on the CPU the
workers take turns on every core, prefills first (baton/shared_cores.py); otherwise each gets a share of the cores
for its host-side work. Every call between the services carries an internal token generated for this run
(baton/rpc/internal_token.py) and handed to them in the environment; their ports refuse callers without it.

Supervision: a service that exits while the stack runs is started again under the same address (its restarts back
off from 0.5 s to 10 s; at most --max-restarts in any minute, past which everything stops, saying so), and the rest
keeps serving meanwhile: the router resumes a dead decode worker's requests on the others and re-prefills a dead
prefill worker's, and a restarted router takes new calls while its clients retry the streams it held. Only Ctrl-C
or SIGTERM (or restarts exhausted) stops the stack: router first, then the workers, which drain.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from baton.flags import (
    add_internal_token_arguments,
    add_model_arguments,
    add_registry_arguments,
    count_or_auto,
    env_default,
    flag,
)


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
    flag(p, "--local-prefill-tokens", "auto", count_or_auto("tokens"),
         help="the router's --local-prefill-tokens: prompts this short are prefilled by their decode worker inside "
              f"its batch (auto: {SHARED_CORES_LOCAL_PREFILL} where the workers take turns on the cores, else 0)")
    flag(p, "--policy", "baton", choices=["baton", "orca", "padded", "static"], help="decode workers' engine policy")
    add_registry_arguments(p)  # without --redis, the router is given the workers' addresses
    add_internal_token_arguments(p)  # default: a new token for this run
    flag(p, "--startup-timeout", 180.0, float, help="seconds every service has to become healthy")
    flag(p, "--max-restarts", 5, int, help="restarts of one service allowed within a minute; past them everything "
                                           "stops (0: a service that exits stops everything)")


# Where prefill and decode workers take turns on the same cores, a prompt run inside the decode batch's iteration
# costs one pass over the weights instead of two and ships no KV (docs/benchmarks.md, "Peers on machine E").
SHARED_CORES_LOCAL_PREFILL = 2048


def local_prefill_tokens(value: str | int, shared_cores: bool) -> int:
    if value == "auto":
        return SHARED_CORES_LOCAL_PREFILL if shared_cores else 0
    return int(value)


def ephemeral_ports() -> range:
    """The ports the kernel hands to outgoing connections (Linux; the IANA range elsewhere)."""
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 49152, 65535
    return range(low, high + 1)


def free_port(taken: set[int] | None = None) -> int:
    """A port free now, outside the kernel's ephemeral range, so that no outgoing connection (to Redis, to another
    worker) takes it between now and the bind of the server it is meant for; with `taken`, also not in it (and
    added to it), so that ports handed out are distinct."""
    ephemeral = ephemeral_ports()
    for _ in range(1000):
        port = random.randrange(10_000, 65_536)
        if port in ephemeral or (taken is not None and port in taken):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        if taken is not None:
            taken.add(port)
        return port
    raise RuntimeError("no free port outside the ephemeral range found in 1000 tries")


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


RESTART_WINDOW_S = 60.0
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.5, 10.0


def exit_status(code: int) -> str:
    """A process's exit status as people read it: "code 1", "signal SIGKILL"."""
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


@dataclass
class Child:
    """One service of the stack: how to start it, its process now, and its recent restarts."""

    name: str  # decode-0, prefill-1, router
    argv: list[str]  # after `baton`
    address: str  # the gRPC address it serves
    proc: subprocess.Popen[bytes]  # its latest start
    restarts: collections.deque[float] = field(default_factory=collections.deque)  # monotonic, last minute
    due: float | None = None  # (monotonic) when it starts again, while it is dead


@dataclass
class Stack:
    env: dict[str, str]  # every service's environment
    max_restarts: int = 5
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], address: str) -> Child:
        child = Child(name, argv, address, self._spawn(argv))
        self.children.append(child)
        return child

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "baton.cli", *argv], env=self.env)

    def supervise(self, now: float) -> str | None:
        """Restart what died (when due): the reason to stop everything when a service ran out of restarts,
        else None. Called every half second."""
        for child in self.children:
            if child.due is not None:
                if now >= child.due:
                    child.proc, child.due = self._spawn(child.argv), None
                    say(f"{child.name} started again (pid {child.proc.pid})")
                continue
            code = child.proc.poll()
            if code is None:
                continue
            while child.restarts and now - child.restarts[0] > RESTART_WINDOW_S:
                child.restarts.popleft()
            if len(child.restarts) >= self.max_restarts:
                return (f"{child.name} exited with {exit_status(code)}, and it was restarted {len(child.restarts)} "
                        f"times within a minute already (--max-restarts {self.max_restarts}); stopping")
            child.restarts.append(now)
            delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (len(child.restarts) - 1))
            child.due = now + delay
            say(f"{child.name} (pid {child.proc.pid}) exited with {exit_status(code)}; starting it again in "
                f"{delay:g} s (restart {len(child.restarts)} of at most {self.max_restarts} a minute)")
        return None

    def stop(self, grace_s: float = 30.0) -> None:
        procs = [c.proc for c in reversed(self.children)]  # router first: no new work
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()


def terminate(proc: subprocess.Popen[bytes], grace_s: float = 60.0) -> None:
    """Stop a process as Ctrl-C would (SIGTERM: a Baton service drains), killing it past `grace_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def say(message: str) -> None:
    print(f"baton serve: {message}", file=sys.stderr, flush=True)


def model_flags(args: argparse.Namespace, threads: int) -> list[str]:
    flags = ["--model", args.model, "--threads", str(threads), "--cpu-gemm", args.cpu_gemm,
             "--cpu-attention", args.cpu_attention]
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
    from baton.rpc.internal_token import new_token, resolve_internal_token

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
    env = dict(os.environ)
    try:
        env["BATON_INTERNAL_TOKEN"] = (resolve_internal_token(args.internal_token, args.internal_token_file)
                                       if args.internal_token or args.internal_token_file else new_token())
    except ValueError as e:
        say(str(e))
        return 2
    stack = Stack(env, args.max_restarts)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        taken = {args.http_port, args.grpc_port}
        decode = [f"127.0.0.1:{free_port(taken)}" for _ in range(args.decode_workers)]
        started: list[Child] = []
        metrics: list[str] = []  # each worker's /metrics URL
        for role, count in (("decode", args.decode_workers), ("prefill", args.prefill_workers)):
            for i in range(count):
                addr = decode[i] if role == "decode" else f"127.0.0.1:{free_port(taken)}"
                metrics_port = free_port(taken)
                argv = [role, "--host", "127.0.0.1", "--port", addr.split(":")[1], "--metrics-port",
                        str(metrics_port), *model_flags(args, threads), *registry, *shared]
                if role == "decode":
                    argv += ["--max-batch", str(args.max_batch), "--policy", args.policy]
                elif not args.redis:
                    argv += ["--decode", *decode]  # the only decode workers it may push KV to
                started.append(stack.start(f"{role}-{i}", argv, addr))
                metrics.append(f"{role}-{i} http://127.0.0.1:{metrics_port}/metrics")
        for w in started:
            wait_serving(w.address, w.proc, args.startup_timeout)
        router_argv = ["router", "--host", args.host, "--grpc-port", str(args.grpc_port),
                       "--http-port", str(args.http_port), "--model", args.model, *registry,
                       "--local-prefill-tokens", str(local_prefill_tokens(args.local_prefill_tokens, bool(shared)))]
        if not args.redis:
            prefill = [w.address for w in started if w.name.startswith("prefill")]
            router_argv += ["--decode", *decode, "--prefill", *prefill]
        router = stack.start("router", router_argv, f"127.0.0.1:{args.grpc_port}")
        wait_serving(router.address, router.proc, args.startup_timeout)
        host = "localhost" if args.host in ("0.0.0.0", "127.0.0.1") else args.host
        print(f"Baton is ready ({args.decode_workers} decode, {args.prefill_workers} prefill workers, "
              f"{threads} threads each{', taking turns on the cores' if shared else ''}).\n"
              f"  OpenAI API: http://{host}:{args.http_port}/v1   (e.g. curl http://{host}:{args.http_port}/v1/models)\n"
              f"  gRPC:       {host}:{args.grpc_port}   (baton generate --url {host}:{args.grpc_port} \"Hello\")\n"
              f"  Metrics:    router http://{host}:{args.http_port}/metrics\n"
              + "".join(f"              {m}\n" for m in metrics)
              + "  Services:   " + ", ".join(f"{c.name} {c.address} (pid {c.proc.pid})"
                                            for c in stack.children) + "\n"
              "Ctrl-C stops everything.", flush=True)
        while not stopping:
            problem = stack.supervise(time.monotonic())
            if problem:
                say(problem)
                return 1
            time.sleep(0.5)
        return 0
    except (RuntimeError, TimeoutError, ValueError) as e:
        say(str(e))
        return 1
    finally:
        stack.stop()
        if lock_dir is not None:
            lock_dir.cleanup()
