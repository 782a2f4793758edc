"""Command-line flags shared by Baton's commands, each with an environment twin (--max-batch <-> BATON_MAX_BATCH).

Below every service and above nothing: the services' `add_arguments` use these, and baton/cli.py, at the top,
wires the services together.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    """Where Baton keeps files between runs (converted models, the internal token): BATON_CACHE_DIR, by default
    ~/.cache/baton."""
    return Path(os.environ.get("BATON_CACHE_DIR", Path.home() / ".cache" / "baton"))


def env_default(name: str, default: str | None = None) -> str | None:
    """Every flag has an environment-variable twin: --max-batch <-> BATON_MAX_BATCH."""
    return os.environ.get("BATON_" + name.upper().replace("-", "_"), default)


def flag(p: argparse.ArgumentParser, name: str, default: Any = None, type: Callable[[str], Any] = str,
         **kwargs: Any) -> None:
    """Add `name` (e.g. "--max-batch") with its environment twin (BATON_MAX_BATCH) as the default when set."""
    env = env_default(name.lstrip("-"))
    p.add_argument(name, type=type, default=default if env in (None, "") else type(env), **kwargs)


def count_or_auto(unit: str) -> Callable[[str], str | int]:
    """A flag's type that reads "auto" or a number of `unit` >= 0 (--local-prefill-tokens, --kv-reserve-bytes)."""
    def parse(text: str) -> str | int:
        if text == "auto":
            return text
        if not text.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is neither auto nor a number of {unit} >= 0")
        return int(text)
    return parse


def addresses_from_env(name: str) -> list[str]:
    """Default addresses from the environment: BATON_DECODE="host:port,host:port"."""
    return [a for a in (env_default(name, "") or "").replace(" ", ",").split(",") if a]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--model", "smollm2-135m",
         help="smollm2-135m (embedded), a Hugging Face model directory, or a Hub id fetched at start (org/name)")
    flag(p, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    flag(p, "--dtype", "auto", help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on CUDA)")
    flag(p, "--threads", 0, int, help="torch CPU threads (0: torch's default)")
    flag(p, "--cpu-gemm", "onednn", choices=["onednn", "aten"],
         help="float32 linear layers on a CPU: onednn (weights packed once at load, faster) or aten (PyTorch's "
              "F.linear); ignored on CUDA")
    flag(p, "--cpu-attention", "auto", choices=["auto", "kernel", "flash"],
         help="a decode step's attention on a CPU: Baton's AVX-512 kernel, built at first use (auto: where it can "
              "run and builds; baton/engine/cpu_attention.py) or PyTorch's flash kernel; ignored on CUDA")


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """Mutual TLS between Baton's services (all three or none; see baton.rpc.server.TlsConfig)."""
    flag(p, "--tls-cert", help="PEM certificate of this service, signed by --tls-ca (enables mutual TLS)")
    flag(p, "--tls-key", help="PEM private key of --tls-cert")
    flag(p, "--tls-ca", help="PEM CA certificate: peers must present a certificate it signed")


def add_internal_token_arguments(p: argparse.ArgumentParser) -> None:
    """The secret calls between Baton's services carry (baton/rpc/internal_token.py)."""
    flag(p, "--internal-token", help="secret every call between Baton's services carries; workers refuse calls "
                                     "without it (prefer BATON_INTERNAL_TOKEN: a command line is visible to all)")
    flag(p, "--internal-token-file",
         help="file holding the internal token when --internal-token is not given, created with a random one when "
              "missing (default: internal-token in Baton's cache directory, so processes of one user agree)")


def add_registry_arguments(p: argparse.ArgumentParser) -> None:
    """The registry flags every service honours alike (workers publish there, routers read it)."""
    flag(p, "--redis", help="the worker registry's URL, e.g. redis://redis:6379/0")
    flag(p, "--redis-prefix", "baton", help="registry key prefix: clusters sharing one Redis use different ones")


def add_worker_arguments(p: argparse.ArgumentParser, port: int, metrics_port: int, drain_s: float,
                         drain_help: str) -> None:
    """The flags prefill and decode workers share: where they listen, how they register, drain, TLS, model."""
    flag(p, "--host", "0.0.0.0", help="address to listen on")
    flag(p, "--port", port, int, help="gRPC port")
    flag(p, "--advertise", help="host:port other services dial (default: this machine's address and --port)")
    add_registry_arguments(p)
    flag(p, "--heartbeat-s", 1.0, float, help="seconds between registry heartbeats")
    flag(p, "--drain-s", drain_s, float, help=drain_help)
    flag(p, "--metrics-port", metrics_port, int, help="HTTP port of the Prometheus /metrics endpoint (0: none)")
    flag(p, "--shared-cores", help="a lock file path: take turns on this machine's CPU cores with the workers given "
                                   "the same path, prefills first (baton serve sets it on a CPU-only machine)")
    add_tls_arguments(p)
    add_internal_token_arguments(p)
    add_model_arguments(p)
