"""The `baton` command, the top of the import graph. Each subcommand lives in its own module, which provides
`add_arguments(parser)` and `main(args) -> int`; this file only wires them together, naming each module by its
path and importing only the one chosen (so `baton --help` is fast, and nothing below imports this file). The
flags the modules share live below them, in baton/flags.py."""

from __future__ import annotations

import argparse
import importlib
import sys

from baton.allocator import KEEP_BYTES, MALLOC_KEEP_HELP, keep_freed_memory
from baton.flags import env_default, flag
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
    (("bench", "structured"), "baton.bench.structured", "a batch's throughput with some rows under a JSON schema"),
    (("bench", "requests"), "baton.bench.export", "write a named workload's requests as `baton run` input (JSONL)"),
    (("bench", "plot"), "baton.bench.plot", "plot benchmark result files"),
    (("bench", "gpu"), "baton.bench.gpu", "the prepared GPU run: exactness, engine, decode, service in one budget"),
]


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
    flag(parser, "--malloc-keep-bytes", KEEP_BYTES, type=int, help=MALLOC_KEEP_HELP)
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
    keep_freed_memory(args.malloc_keep_bytes)  # before any tensor is made: every command, every process
    threads = getattr(args, "threads", 0)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return int(importlib.import_module(args._module).main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
