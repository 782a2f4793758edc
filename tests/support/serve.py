"""`baton serve` as a test runs it: the command users run, started as a process, with the addresses and process
ids of its services read from what it prints (its ready banner, and a line per restart)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from baton.health import is_serving
from baton.serve import terminate
from tests.support.processes import ROOT, free_port, internal_token

_SERVICE = re.compile(r"([a-z]+-\d+|router) (\S+:\d+) \(pid (\d+)\)")
_RESTARTED = re.compile(r"baton serve: ([a-z]+-\d+|router) started again \(pid (\d+)\)")


@dataclass
class Serve:
    proc: subprocess.Popen[bytes]
    log: Path
    http: str  # base URL of the OpenAI API
    grpc: str  # host:port of the gRPC API

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def addresses(self) -> dict[str, str]:
        """Every service's gRPC address, by name (decode-0, prefill-1, router)."""
        banner = self.text().split("Services:", 1)[1].splitlines()[0]
        return {name: address for name, address, _ in _SERVICE.findall(banner)}

    def metrics_url(self, name: str) -> str:
        """A worker's Prometheus endpoint, as the banner lists it."""
        found = re.search(rf"{re.escape(name)} (http://\S+/metrics)", self.text())
        assert found, f"no metrics URL for {name}"
        return found.group(1)

    def decode(self) -> list[str]:
        return [a for n, a in self.addresses().items() if n.startswith("decode")]

    def prefill(self) -> list[str]:
        return [a for n, a in self.addresses().items() if n.startswith("prefill")]

    def pid(self, name: str) -> int:
        """The process id of the service now (its latest start)."""
        text = self.text()
        pids = {n: int(p) for n, _, p in _SERVICE.findall(text.split("Services:", 1)[1].splitlines()[0])}
        pids.update({n: int(p) for n, p in _RESTARTED.findall(text)})
        return pids[name]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(name)
        os.kill(pid, sig)
        return pid

    def wait_back(self, name: str, old_pid: int, timeout: float = 120.0) -> int:
        """Wait until `baton serve` started the service again and it reports SERVING; its new pid."""
        deadline = time.monotonic() + timeout
        address = self.addresses()[name]
        while True:
            assert self.proc.poll() is None, f"baton serve exited:\n{self.text()[-3000:]}"
            with contextlib.suppress(KeyError):
                pid = self.pid(name)
                if pid != old_pid and is_serving(address, 1.0):
                    return pid
            assert time.monotonic() < deadline, f"{name} did not come back:\n{self.text()[-3000:]}"
            time.sleep(0.2)


@contextlib.contextmanager
def baton_serve(model_dir: Path, logs: Path, *args: str, timeout: float = 180.0,
                env: dict[str, str] | None = None) -> Iterator[Serve]:
    """Run `baton serve` with the tiny model and `args` (and `env` added to its environment) until the block ends
    (then SIGTERM, as Ctrl-C would). Its services take the session's internal token, so the test's
    worker_channel() reaches them."""
    http_port, grpc_port = free_port(), free_port()
    log = logs / "serve.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", BATON_INTERNAL_TOKEN=internal_token(), **(env or {}))
    proc = subprocess.Popen(
        [sys.executable, "-m", "baton.cli", "serve", "--model", str(model_dir), "--threads", "1",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port), *args],
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )
    serve = Serve(proc, log, f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    try:
        deadline = time.monotonic() + timeout
        while "Ctrl-C stops everything" not in serve.text():
            assert proc.poll() is None, f"baton serve exited:\n{serve.text()[-3000:]}"
            assert time.monotonic() < deadline, "baton serve did not become ready"
            time.sleep(0.2)
        yield serve
    finally:
        terminate(proc)
