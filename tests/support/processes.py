"""Helpers for tests that run Baton's services as real processes (and a real Redis)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from baton.rpc.internal_token import blocking_channel, resolve_internal_token
from baton.serve import free_port, terminate
from baton.v1 import baton_pb2 as pb
from baton.v1 import baton_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]  # the repository




def internal_token() -> str:
    """The token of the worker processes tests start: from the token file conftest.py names for the session in
    BATON_INTERNAL_TOKEN_FILE, which every process started here inherits."""
    return resolve_internal_token(None, os.environ.get("BATON_INTERNAL_TOKEN_FILE"))


def worker_channel(address: str) -> grpc.Channel:
    """A channel to a worker process started without --internal-token: its calls carry the session's token, as
    the worker's callers do (a test is one more process of the same user)."""
    return blocking_channel(address, internal_token())


def wait_serving(address: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{address} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            with contextlib.suppress(grpc.RpcError):
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"{address} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@dataclass
class Processes:
    """Processes started for a test, stopped (router first) at teardown."""

    logs: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def baton(self, name: str, *argv: str, wait_address: str | None = None) -> subprocess.Popen[bytes]:
        log = self.logs / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "baton.cli", *argv], cwd=ROOT,
                                stdout=log.open("wb"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        if wait_address:
            wait_serving(wait_address, proc, log)
        return proc

    def redis(self) -> str:
        port = free_port()
        exe = shutil.which("redis-server")
        assert exe, "redis-server is needed for this test"
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                                stdout=(self.logs / "redis.log").open("wb"), stderr=subprocess.STDOUT)
        self.procs.append(proc)
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return f"redis://127.0.0.1:{port}/0"
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            terminate(proc, 15.0)


@contextlib.contextmanager
def processes(logs: Path) -> Iterator[Processes]:
    ps = Processes(logs)
    try:
        yield ps
    finally:
        ps.stop_all()


def occupancy(address: str, worker: str = "decode") -> pb.OccupancyResponse:
    with worker_channel(address) as ch:
        stub = (baton_pb2_grpc.DecodeWorkerStub if worker == "decode" else baton_pb2_grpc.PrefillWorkerStub)(ch)
        reply: pb.OccupancyResponse = stub.Occupancy(pb.OccupancyRequest(), timeout=5)
        return reply


def wait_idle(decode: list[str], prefill: list[str], timeout: float = 30.0) -> None:
    """Until no decode worker holds a row or a reservation and no prefill worker has work queued."""
    deadline = time.monotonic() + timeout
    while True:
        d = [occupancy(a) for a in decode]
        p = [occupancy(a, "prefill") for a in prefill]
        if all(o.active_rows == 0 and o.waiting == 0 and o.kv_tokens_used == 0 for o in d) and all(
            o.waiting == 0 for o in p
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"workers not idle: decode={d} prefill={p}")
        time.sleep(0.1)
