"""The `baton` command. Each subcommand lives in its own module, which provides `add_arguments(parser)` and
`main(args) -> int`; this file only wires them together (imported lazily, so `baton --help` is fast)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from baton.logs import setup_logging

# (command path, module, help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("serve",), "baton.serve", "the whole stack on this machine: router, prefill and decode workers"),
    (("router",), "services.router.main", "the router: public gRPC and OpenAI-compatible HTTP API"),
    (("prefill",), "services.prefill.main", "a prefill worker"),
    (("decode",), "services.decode.main", "a decode worker"),
    (("health",), "baton.health", "exit 0 when a Baton service answers SERVING on gRPC health (HEALTHCHECK)"),
    (("generate",), "baton.generate", "send one prompt to a running Baton and print the completion"),
    (("run",), "baton.offline", "run a JSONL file of requests through the engine, offline"),
    (("bench", "engine"), "baton.bench.engine_bench", "measure one engine policy on a named workload"),
    (("bench", "decode"), "baton.bench.microbench", "decode step vs a bare dense loop, and splice cost"),
    (("bench", "serve"), "baton.bench.serve_bench", "load a running service at arrival rates; client latencies"),
    (("bench", "costs"), "baton.bench.costs", "cost curves: decode step vs batch and context, splice, KV shipping"),
    (("bench", "plot"), "baton.bench.plot", "plot benchmark result files"),
]


def env_default(name: str, default: str | None = None) -> str | None:
    """Every flag has an environment-variable twin: --max-batch <-> BATON_MAX_BATCH."""
    return os.environ.get("BATON_" + name.upper().replace("-", "_"), default)


def flag(p: argparse.ArgumentParser, name: str, default: Any = None, type: Callable[[str], Any] = str,
         **kwargs: Any) -> None:
    """Add `name` (e.g. "--max-batch") with its environment twin (BATON_MAX_BATCH) as the default when set."""
    env = env_default(name.lstrip("-"))
    p.add_argument(name, type=type, default=default if env in (None, "") else type(env), **kwargs)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    flag(p, "--model", "smollm2-135m",
         help="smollm2-135m (embedded), a Hugging Face model directory, or a Hub id fetched at start (org/name)")
    flag(p, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    flag(p, "--dtype", "auto", help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on CUDA)")
    flag(p, "--threads", 0, int, help="torch CPU threads (0: torch's default)")


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    """Mutual TLS between Baton's services (all three or none; see baton.rpc.server.TlsConfig)."""
    flag(p, "--tls-cert", help="PEM certificate of this service, signed by --tls-ca (enables mutual TLS)")
    flag(p, "--tls-key", help="PEM private key of --tls-cert")
    flag(p, "--tls-ca", help="PEM CA certificate: peers must present a certificate it signed")


def add_worker_arguments(p: argparse.ArgumentParser, port: int, metrics_port: int, drain_s: float,
                         drain_help: str) -> None:
    """The flags prefill and decode workers share: where they listen, how they register, drain, TLS, model."""
    flag(p, "--host", "0.0.0.0", help="address to listen on")
    flag(p, "--port", port, int, help="gRPC port")
    flag(p, "--advertise", help="host:port other services dial (default: this machine's address and --port)")
    flag(p, "--redis", help="registry URL to register with, e.g. redis://redis:6379/0")
    flag(p, "--heartbeat-s", 1.0, float, help="seconds between registry heartbeats")
    flag(p, "--drain-s", drain_s, float, help=drain_help)
    flag(p, "--metrics-port", metrics_port, int, help="HTTP port of the Prometheus /metrics endpoint (0: none)")
    flag(p, "--shared-cores", help="a lock file path: take turns on this machine's CPU cores with the workers given "
                                   "the same path, prefills first (baton serve sets it on a CPU-only machine)")
    add_tls_arguments(p)
    add_model_arguments(p)


def _chosen(argv: list[str]) -> tuple[str, ...] | None:
    """The command path named by argv (e.g. ("bench", "engine")), found without importing any command."""
    words = [a for a in argv if not a.startswith("-")]
    for path, _, _ in COMMANDS:
        if tuple(words[: len(path)]) == path:
            return path
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported to add its arguments."""
    chosen = _chosen(argv)
    parser = argparse.ArgumentParser(prog="baton", description="Baton: disaggregated LLM serving with BATON")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=(env_default("log_json", "") or "").lower() not in ("", "0", "false", "no"),
        help="log one JSON object per line (BATON_LOG_JSON=1)",
    )
    subs = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, module, help_text in COMMANDS:
        container = subs
        if len(path) == 2:
            if path[0] not in groups:
                groups[path[0]] = subs.add_parser(path[0], help="benchmarks").add_subparsers(
                    dest="subcommand", required=True
                )
            container = groups[path[0]]
        p = container.add_parser(path[-1], help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if path == chosen:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    setup_logging(args.verbose, args.log_json)
    threads = getattr(args, "threads", 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
