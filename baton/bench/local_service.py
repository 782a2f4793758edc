"""`baton serve` as a benchmark runs it: the whole stack started as a child process, its router's gRPC address once
it serves, and the stack stopped (SIGTERM, as Ctrl-C would) when the block ends, whatever happens in it.

Only the gRPC API is served (`--http-port 0`: no HTTP server, so neither fastapi nor uvicorn is needed) and no
Redis (the router is given the workers' addresses). `missing_modules` says beforehand what the stack would fail
to import on this machine.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

# Third-party modules the stack imports whatever its flags (redis: the registry module, imported by the router's
# worker pool and the worker frame even without --redis; grpc_health and grpc_reflection: every gRPC server).
REQUIRED = ("grpc", "google.protobuf", "grpc_health", "grpc_reflection", "redis", "prometheus_client", "psutil",
            "tqdm")
# The modules `baton serve` and `baton bench serve` run, imported here to find any other gap (a protobuf runtime
# older than the generated stubs, say).
ENTRY_MODULES = ("baton.serve", "services.router.main", "services.decode.main", "services.prefill.main",
                 "baton.bench.serve_bench")


def missing_modules(required: tuple[str, ...] = REQUIRED, entry: tuple[str, ...] = ENTRY_MODULES) -> dict[str, str]:
    """What the stack needs and this interpreter cannot import: {module: why}; empty when all is there."""
    missing: dict[str, str] = {}
    for name in required:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing[name] = "not installed"
    for module in entry if not missing else ():
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - whatever stops the import is what the record must say
            missing[module] = f"cannot be imported: {type(e).__name__}: {e}"
            break
    return missing


def child_env() -> dict[str, str]:
    """The environment of a child process that runs this checkout's Baton (`python -m baton.cli ...`)."""
    root = str(Path(__file__).resolve().parents[2])  # the checkout, as the child's sys.path[0] would not be
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=root + (os.pathsep + path if path else ""))


@contextlib.contextmanager
def local_service(model_dir: Path, *, device: str, dtype: str, max_batch: int, policy: str = "baton",
                  threads: int = 0, startup_timeout_s: float = 300.0) -> Iterator[str]:
    """Run `baton serve` (one prefill and one decode worker) on `model_dir`; yields the router's gRPC address
    once it serves. Its output goes to this process's stdout."""
    from baton.serve import free_port, terminate, wait_serving

    port = free_port()
    argv = [sys.executable, "-m", "baton.cli", "serve", "--model", str(model_dir), "--device", device,
            "--dtype", dtype, "--http-port", "0", "--grpc-port", str(port), "--max-batch", str(max_batch),
            "--policy", policy, "--startup-timeout", str(startup_timeout_s), "--max-restarts", "0"]
    if threads:
        argv += ["--threads", str(threads)]
    sys.stdout.flush()
    proc = subprocess.Popen(argv, env=child_env())
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address, proc, startup_timeout_s)
        yield address
    finally:
        terminate(proc)
