"""`baton bench serve`: load a running Baton service, or any OpenAI-compatible server, with a named workload and
measure what clients see.

    baton bench serve --url 127.0.0.1:50051 --workload poisson --rate 2 --duration 120 --out serve.json
    baton bench serve --workload mixed --rate inf --out serve-mixed.json         # all 64 at t=0, as `bench engine`
    baton bench serve --workload poisson --rates 0.5,1,2,4 --duration 120 --policy orca --out-dir results/serve
    baton bench serve --api openai --url http://127.0.0.1:8000 --workload mixed --policy vllm --out vllm.json

Requests are drawn from the same named, seeded workloads as `baton bench engine` (workloads.py), tokenized with
the service's tokenizer (--model, as the service was started with) and sent as token ids with EOS ignored:
`--api grpc` (the default) over the router's gRPC streaming API (loadgen.py); `--api openai` as streaming
`POST /v1/completions` to the server at --url, naming --served-model (by default the first of its /v1/models),
timed the same way as far as the stream allows (openai_load.py). Arrivals:

- `--rate inf` (the default for `mixed`): the whole workload at t=0, the very requests `baton bench engine`
  serves for the same workload, seed and --requests (its --num-requests);
- `--rate R --requests N` (or neither, for the workload's own count): N Poisson arrivals, the same requests and
  arrival times as `baton bench engine --rate R --num-requests N`;
- `--rate R --duration S`: Poisson arrivals for S seconds, cycling through the workload's requests.
- `chat` (a conversation workload): --rate is conversations/s (default 0.5) and --requests their number; each
  conversation sends its turns one after another, each prompt the conversation so far with the answers the service
  gave (loadgen.run_conversations; over the OpenAI API with `return_token_ids`, vLLM's extension, which Baton's
  HTTP API honours too). Every turn is a request of
  the results.

Each rate ends when its last request has; throughput is over that time. `--rates` runs several rates one after
another. Results: one JSON object per rate (--out FILE.json holds one object, or a list for several rates;
--out-dir DIR gets <workload>[-rate<R>]-<policy>.json per rate); `baton bench plot` draws them against the rate.
The service does not say which decode policy it runs: name it with --policy (a label in the results). Each result
says which API it measured (`api`: grpc or openai) and, for openai, the model name it sent (`served_model`).
With `--metrics URL ...` (Baton's services' /metrics endpoints, as `baton serve` prints them) each result also
holds `breakdown`: where the requests' time went through the services during that rate (breakdown.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import sys
import urllib.parse
from collections import Counter
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from baton.bench import breakdown
from baton.bench.engine_bench import output_paths, percentiles
from baton.bench.loadgen import (
    Connect,
    LoadError,
    Outcome,
    Sender,
    Target,
    grpc_connect,
    plan,
    poisson_arrivals,
    run_conversations,
    run_load,
    warm_up,
)
from baton.bench.workloads import WORKLOADS, WorkloadSpec, draw, draw_conversations, get_workload
from baton.flags import env_default

APIS = ("grpc", "openai")
DEFAULT_URLS = {"grpc": "127.0.0.1:50051", "openai": "http://127.0.0.1:8000"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", default="grpc", choices=APIS,
                   help="grpc: Baton's router (the default); openai: any OpenAI-compatible server (vLLM, SGLang, "
                        "TGI, Baton's HTTP API), streaming /v1/completions")
    p.add_argument("--url", help="grpc: the router's address host:port (default 127.0.0.1:50051), or several "
                                 "routers' host:port,host:port, each request sent to the next; openai: the "
                                 "server's base URL http://HOST:PORT, with or without /v1 (default "
                                 "http://127.0.0.1:8000)")
    p.add_argument("--served-model", help="openai: the model name requests send (default: the first id of "
                                          "GET /v1/models)")
    p.add_argument("--model", default=env_default("model", "smollm2-135m"),
                   help="the model the service runs, for its tokenizer (default smollm2-135m)")
    p.add_argument("--workload", default="mixed", choices=sorted(WORKLOADS), help="named workload (default mixed)")
    p.add_argument("--rate", type=float, help="Poisson arrivals in requests/s, or inf: all at t=0 "
                                              "(default: the workload's own, inf for mixed)")
    p.add_argument("--rates", help="several rates, comma separated, run one after another (e.g. 0.5,1,2,inf)")
    p.add_argument("--duration", type=float, help="seconds of Poisson arrivals (finite rates)")
    p.add_argument("--requests", type=int, help="number of requests (default: the workload's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn workload and arrivals (default 0)")
    p.add_argument("--prompt-min", type=int, help="override the shortest prompt (tokens)")
    p.add_argument("--prompt-max", type=int, help="override the longest prompt (tokens)")
    p.add_argument("--output-min", type=int, help="override the fewest output tokens")
    p.add_argument("--output-max", type=int, help="override the most output tokens")
    p.add_argument("--policy", default=env_default("policy", "unknown"),
                   help="the service's decode policy, recorded in the results (baton, orca, padded, static)")
    p.add_argument("--api-key", default=env_default("api_key"),
                   help="the service's API key, if it has one (sent as Authorization: Bearer)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--out", type=Path, help="result JSON file (a list when several rates)")
    p.add_argument("--out-dir", type=Path, help="directory for <workload>[-rate<R>]-<policy>.json files")
    p.add_argument("--metrics", nargs="+", default=[], metavar="URL",
                   help="Baton's /metrics endpoints (router and workers) to scrape before and after each rate: the "
                        "results gain `breakdown`, where the time went through the services")
    p.add_argument("--no-warmup", action="store_true", help="skip the two untimed warm-up requests")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_rates(args: argparse.Namespace, spec: WorkloadSpec) -> list[float]:
    """The rates to run, inf meaning all at t=0."""
    if args.rates is not None and args.rate is not None:
        raise ValueError("give --rate or --rates, not both")
    if args.rates is not None:
        try:
            rates = [float(r) for r in str(args.rates).split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"--rates: not a list of numbers: {args.rates!r}") from None
    elif args.rate is not None:
        rates = [float(args.rate)]
    else:
        rates = [math.inf if spec.rate is None else spec.rate]
    if not rates or any(math.isnan(r) or r <= 0 for r in rates):
        raise ValueError("rates must be > 0 requests/s (or inf)")
    return rates


def grpc_address(url: str) -> str:
    """host:port, or several routers' host:port,host:port (requests take turns among them)."""
    addresses = []
    for one in url.split(","):
        if one.startswith(("http://", "https://")):
            raise ValueError(f"--url {url!r}: give the router's gRPC address (host:port, its --grpc-port), not "
                             "HTTP (for an OpenAI-compatible HTTP API add --api openai)")
        address = one.strip().removeprefix("grpc://").rstrip("/")
        if ":" not in address:
            raise ValueError(f"--url {url!r}: expected host:port (or several, comma-separated)")
        addresses.append(address)
    return ",".join(addresses)


def openai_base_url(url: str) -> str:
    """The server's base URL without a trailing /v1: http://host:port[/prefix]."""
    bad = ValueError(f"--url {url!r}: --api openai takes the server's base URL, http://HOST:PORT (with or "
                     "without /v1)")
    try:
        parts = urllib.parse.urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise bad
    path = parts.path.rstrip("/").removesuffix("/v1").rstrip("/")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def make_target(args: argparse.Namespace) -> Target:
    """Where the load goes, from --api, --url, --api-key and --served-model; ValueError for a bad --url."""
    api = args.api
    url = args.url or DEFAULT_URLS[api]
    if api == "openai":
        return Target("openai", openai_base_url(url), args.api_key, args.served_model)
    if args.served_model is not None:
        raise ValueError("--served-model is for --api openai (the gRPC API serves the router's model)")
    return Target("grpc", grpc_address(url), args.api_key)


def load_tokenizer(model: str) -> tuple[Any, int]:
    """The model's tokenizer (None if it has none) and vocabulary size, without loading its weights."""
    from transformers import AutoConfig, AutoTokenizer

    from baton.engine.models import resolve_model_path

    path = resolve_model_path(model)
    vocab = int(AutoConfig.from_pretrained(path).vocab_size)
    try:
        return AutoTokenizer.from_pretrained(path), vocab
    except (OSError, ValueError):
        return None, vocab


def main(args: argparse.Namespace) -> int:
    try:
        target = make_target(args)
        if args.out is not None and args.out_dir is not None:
            raise ValueError("give --out or --out-dir, not both")
        if args.duration is not None and not args.duration > 0:
            raise ValueError("--duration must be > 0 seconds")
        if WORKLOADS[args.workload].turns is not None and args.duration is not None:
            raise ValueError(f"--workload {args.workload}: conversations take --rate and --requests, not --duration")
        spec = get_workload(args.workload, num_requests=args.requests, seed=args.seed, prompt_min=args.prompt_min,
                            prompt_max=args.prompt_max, output_min=args.output_min, output_max=args.output_max)
        rates = parse_rates(args, spec)
    except ValueError as e:
        print(f"baton bench serve: {e}", file=sys.stderr)
        return 2
    tokenizer, vocab = load_tokenizer(args.model)
    return asyncio.run(sweep(args, target, spec, rates, tokenizer, vocab))


def connect(target: Target, token_ids: bool = False) -> Connect:
    """How to open a sender to `target` (its API decides; httpx is imported only for the OpenAI API); with
    `token_ids`, one that gives the answers' token ids (conversations need them; gRPC always does)."""
    if target.api == "grpc":
        return functools.partial(grpc_connect, target)
    if target.api == "openai":
        from baton.bench.openai_load import OpenAISender

        def open_openai(timeout_s: float | None, concurrency: int) -> AbstractAsyncContextManager[Sender]:
            return OpenAISender(target, timeout_s, concurrency, token_ids)

        return open_openai
    raise ValueError(f"unknown api {target.api!r}: grpc or openai")


async def sweep(args: argparse.Namespace, target: Target, spec: WorkloadSpec, rates: list[float], tokenizer: Any,
                vocab: int) -> int:
    reports: list[dict[str, Any]] = []
    try:
        if target.api == "openai" and target.model is None:
            from baton.bench.openai_load import first_model

            target = dataclasses.replace(target, model=await first_model(target.url, target.api_key))
            print(f"baton bench serve: {target.url} serves {target.model!r} (the first of /v1/models)", flush=True)
        if not args.no_warmup:
            try:
                await warm_up(connect(target), draw(spec, tokenizer, vocab)[:1])
            except LoadError as e:
                raise LoadError(f"the service at {target.url} failed its warm-up requests: {e}") from None
    except LoadError as e:
        print(f"baton bench serve: {e}", file=sys.stderr)
        return 1
    for rate in rates:
        report = await run_rate(args, target, spec, rate, tokenizer, vocab)
        reports.append(report)
        save(reports, args.out, args.out_dir)
        print(one_line(report), flush=True)
    written = sorted({str(p) for p in output_paths(reports, args.out, args.out_dir) if p is not None})
    print("wrote " + ", ".join(written) if written else "(no --out/--out-dir: results not saved)")
    return 0 if all(r["requests_completed"] > 0 for r in reports) else 1


async def run_rate(args: argparse.Namespace, target: Target, spec: WorkloadSpec, rate: float, tokenizer: Any,
                   vocab: int) -> dict[str, Any]:
    desc = "all at t=0" if math.isinf(rate) else f"{rate:g} req/s"
    before = await asyncio.to_thread(breakdown.scrape, args.metrics) if args.metrics else None
    if spec.turns is not None:  # conversations, closed loop
        conversations = draw_conversations(dataclasses.replace(spec, rate=None if math.isinf(rate) else rate),
                                           tokenizer, vocab)
        outcomes, elapsed = await run_conversations(connect(target, token_ids=True), conversations,
                                                    args.request_timeout, progress=not args.no_progress, desc=desc)
        return finish_rate(args, target, spec, rate, outcomes, elapsed, before)
    if math.isinf(rate):
        planned = plan(draw(dataclasses.replace(spec, rate=None), tokenizer, vocab))
    elif args.duration is not None:
        pool = draw(dataclasses.replace(spec, rate=None), tokenizer, vocab)
        planned = plan(pool, poisson_arrivals(rate, spec.seed, duration=args.duration, count=args.requests))
    else:
        pool = draw(dataclasses.replace(spec, rate=rate), tokenizer, vocab)
        planned = plan(pool, [r.arrival_s for r in pool])
    outcomes, elapsed = await run_load(connect(target), planned, args.request_timeout,
                                       progress=not args.no_progress, desc=desc)
    return finish_rate(args, target, spec, rate, outcomes, elapsed, before)


def finish_rate(args: argparse.Namespace, target: Target, spec: WorkloadSpec, rate: float, outcomes: list[Outcome],
                elapsed: float, before: breakdown.Snapshot | None) -> dict[str, Any]:
    """The rate's report, with the breakdown since `before` when the services' metrics were given."""
    print_errors(outcomes)
    report = make_report(outcomes, elapsed, args, spec, rate, target)
    if before is not None:
        report["breakdown"] = breakdown.difference(before, breakdown.scrape(args.metrics))
        print(breakdown.table(report["breakdown"]), flush=True)
    return report


def print_errors(outcomes: list[Outcome]) -> None:
    """What each kind of error said, the first time it said it (the results count them by kind only)."""
    first: dict[str, tuple[int, str | None]] = {}
    for o in outcomes:
        if o.error is not None:
            count, detail = first.get(o.error, (0, o.detail))
            first[o.error] = (count + 1, detail)
    for kind, (count, detail) in first.items():
        print(f"baton bench serve: {count} request{'s' if count != 1 else ''} failed with {kind}"
              f"{f': {detail}' if detail else ''}", file=sys.stderr)


def save(reports: list[dict[str, Any]], out: Path | None, out_dir: Path | None) -> None:
    """Write what has been measured so far (an interrupted sweep keeps its finished rates)."""
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2) + "\n")
    elif out_dir is not None:
        path = output_paths(reports[-1:], None, out_dir)[0]
        assert path is not None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(reports[-1], indent=2) + "\n")


def make_report(outcomes: list[Outcome], elapsed: float, args: argparse.Namespace, spec: WorkloadSpec,
                rate: float, target: Target) -> dict[str, Any]:
    ok = [o for o in outcomes if o.ok]
    out_tokens = sum(o.output_tokens for o in ok)
    tpot = [(o.e2e_s - o.ttft_s) / (o.output_tokens - 1) for o in ok
            if o.output_tokens > 1 and o.e2e_s is not None and o.ttft_s is not None]
    finite = not math.isinf(rate)
    return {
        "kind": "serve",
        "api": target.api,  # grpc: Baton's router; openai: streaming /v1/completions
        "url": target.url,
        "served_model": target.model,  # openai: the model name sent; null for grpc
        "workload": spec.name,
        "workload_params": spec.params(),
        "rate": rate if finite else None,  # requests/s; null: all at t=0
        "arrivals": "poisson" if finite else "all at t=0",
        "duration": args.duration if finite else None,  # seconds of arrivals asked for; null: a fixed count
        "seed": spec.seed,
        "policy": args.policy,
        "model": args.model,
        "num_requests": len(outcomes),  # for chat: turns
        "conversations": len({o.conversation for o in outcomes}) if spec.turns is not None else None,
        "requests_completed": len(ok),
        "requests_failed": len(outcomes) - len(ok),
        "errors": dict(Counter(o.error or "INCOMPLETE" for o in outcomes if not o.ok)),
        "prompt_tokens": sum(o.prompt_len for o in ok),
        "output_tokens": out_tokens,
        "requested_output_tokens": sum(o.max_new_tokens for o in ok),
        "duration_s": elapsed,  # from the start to the end of the last request
        "output_tokens_per_s": out_tokens / elapsed if elapsed > 0 else None,
        "requests_per_s": len(ok) / elapsed if elapsed > 0 else None,
        "ttft_s": percentiles([o.ttft_s for o in ok if o.ttft_s is not None]),
        "itl_s": percentiles([x for o in ok for x in o.itl_s]),
        "tpot_s": percentiles(tpot),
        "e2e_s": percentiles([o.e2e_s for o in ok if o.e2e_s is not None]),
        "send_lag_s": percentiles([o.sent_s - o.scheduled_s for o in outcomes]),  # the client keeping up
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "client": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                   "python": platform.python_version()},
        "requests": [o.summary() for o in outcomes],
    }


def _fmt(x: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if x is None else f"{x * scale:.{digits}f}"


def one_line(r: dict[str, Any]) -> str:
    rate = "all at t=0" if r["rate"] is None else f"{r['rate']:g} req/s"
    errors = ", ".join(f"{k} {v}" for k, v in r["errors"].items())
    return (f"{r['policy']} @ {rate}: {r['requests_completed']}/{r['num_requests']} completed"
            f"{f' ({errors})' if errors else ''}, {_fmt(r['output_tokens_per_s'], digits=1)} tok/s, "
            f"{_fmt(r['requests_per_s'], digits=3)} req/s, TTFT p50/p90/p99 {_fmt(r['ttft_s']['p50'])}/"
            f"{_fmt(r['ttft_s']['p90'])}/{_fmt(r['ttft_s']['p99'])} s, ITL p50/p99 "
            f"{_fmt(r['itl_s']['p50'], 1000, 1)}/{_fmt(r['itl_s']['p99'], 1000, 1)} ms, e2e p50/p99 "
            f"{_fmt(r['e2e_s']['p50'])}/{_fmt(r['e2e_s']['p99'])} s, {r['duration_s']:.1f} s")
