"""`baton generate`: send one prompt to a running Baton (e.g. `baton serve`) and print the completion.

    baton generate "The capital of France is"
    baton generate --stream --max-new-tokens 200 --temperature 0.7 --seed 1 "Once upon a time"
    baton generate --chat "Write a haiku about trains."
    baton generate --chat --json-schema person.json "Invent a person."
    baton generate --logprobs 3 "The capital of France is"
    echo "A long prompt" | baton generate -

The prompt goes to the router's gRPC API (--url). With --chat it is sent as one user message, to which the
router applies the model's chat template. With --logprobs K each generated token's log-probability and the K
most likely tokens at its place are printed to stderr after the text. Exit status 1, with the reason on stderr,
when the request fails or Baton cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

from baton.flags import env_default

DEFAULT_URL = "127.0.0.1:50051"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt ('-': read it from stdin)")
    p.add_argument("--url", default=env_default("url", DEFAULT_URL),
                   help=f"the router's gRPC address, host:port (default: {DEFAULT_URL})")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message, with the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=int(env_default("max_new_tokens", "128") or 128),
                   help="tokens to generate at most (default: 128)")
    p.add_argument("--temperature", type=float, default=float(env_default("temperature", "0") or 0),
                   help="0: greedy (the default)")
    p.add_argument("--top-p", type=float, default=float(env_default("top_p", "1") or 1))
    p.add_argument("--seed", type=int, default=_optional_int(env_default("seed")),
                   help="makes a sampled completion reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (may be repeated)")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--min-tokens", type=int, default=0, help="no end of sequence before this many tokens")
    p.add_argument("-n", "--choices", type=int, default=1, metavar="N",
                   help="N completions of the prompt from one prefill, printed one after another (not with --stream)")
    p.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="print each token's log-probability and the K most likely tokens (to stderr)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="the output is a JSON object (structured output)")
    fmt.add_argument("--json-schema", metavar="FILE", help="the output is JSON valid against this JSON schema")
    p.add_argument("--timeout", type=float, default=_optional_float(env_default("timeout")),
                   help="seconds the request may take (default: no limit)")
    p.add_argument("--api-key", default=env_default("api_key"),
                   help="the router's API key, when it requires one (sent as a bearer token)")
    p.add_argument("--model-name", default=env_default("model_name"),
                   help="one of the router's served model names (default: its model; see its /v1/models)")


def _optional_int(text: str | None) -> int | None:
    return None if text is None else int(text)


def _optional_float(text: str | None) -> float | None:
    return None if text is None else float(text)


class Failed(Exception):
    """The request failed; the message is for the person at the terminal."""


def main(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt: Any = [{"role": "user", "content": text}] if args.chat else text
    sampling: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                "top_p": args.top_p, "seed": args.seed, "stop": args.stop,
                                "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
                                "min_tokens": args.min_tokens, "logprobs": args.logprobs}
    t0 = time.perf_counter()
    try:
        sampling["response_format"] = _response_format(args)
        finish, usage = _generate(args, prompt, sampling)
    except Failed as e:
        print(f"\nbaton generate: {e}" if args.stream else f"baton generate: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    print(flush=True)
    if getattr(args, "verbose", False):
        print(f"[{finish}; {usage[0]} prompt + {usage[1]} completion tokens; {time.perf_counter() - t0:.2f} s]",
              file=sys.stderr)
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# ---- gRPC ------------------------------------------------------------------------------------------------
def _response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    if args.json:
        return {"type": "json_object"}
    if args.json_schema:
        try:
            with open(args.json_schema) as f:
                schema = json.load(f)
        except (OSError, ValueError) as e:
            raise Failed(f"--json-schema {args.json_schema}: {e}") from None
        return {"type": "json_schema", "json_schema": {"name": "schema", "schema": schema}}
    return None


def _generate(args: argparse.Namespace, prompt: Any, sampling: dict[str, Any]) -> tuple[str, tuple[int, int]]:
    import grpc

    from baton.client import BatonClient, BatonError, TokenLogprobs

    lps: list[TokenLogprobs] = []
    try:
        with BatonClient(args.url, timeout=args.timeout, api_key=args.api_key) as client:
            model = args.model_name or ""
            if args.choices > 1 and args.stream:
                raise Failed("--stream prints one choice: leave out -n, or --stream")
            if not args.stream:
                c = client.generate(prompt, model=model, n=args.choices, **sampling)
                if not c.choices:
                    _write(c.text)
                for choice in c.choices:
                    _write(f"{chr(10) * 2 if choice.index else ''}[choice {choice.index}] {choice.text}")
                _print_logprobs(c.logprobs)
                return c.finish_reason, (c.prompt_tokens, c.completion_tokens)
            finish, usage = "", (0, 0)
            for chunk in client.stream(prompt, model=model, **sampling):
                _write(chunk.text)
                lps += chunk.logprobs
                if chunk.finish_reason is not None:
                    finish, usage = chunk.finish_reason, (chunk.prompt_tokens, chunk.completion_tokens)
            _print_logprobs(lps)
            return finish, usage
    except BatonError as e:
        if e.code is grpc.StatusCode.UNAVAILABLE and not _reachable(args.url):
            raise Failed(f"cannot reach Baton at {args.url} ({e.message}). Is it running? Start it with "
                         "`baton serve`, or give its address with --url.") from None
        raise Failed(_describe(e.code.name, e.message)) from None


def _print_logprobs(lps: Any) -> None:
    """One line per token on stderr: its text and logprob, then the most likely tokens there."""
    if lps:
        print(file=sys.stderr)
    for lp in lps:
        top = "  ".join(f"{t.text!r} {t.logprob:.3f}" for t in lp.top)
        print(f"{lp.chosen.text!r:>16} {lp.chosen.logprob:8.3f}   {top}", file=sys.stderr)


def _describe(code: str, message: str) -> str:
    what = {"INVALID_ARGUMENT": "invalid request", "RESOURCE_EXHAUSTED": "Baton is busy, try again later",
            "UNAVAILABLE": "Baton cannot serve the request now", "DEADLINE_EXCEEDED": "timed out",
            "UNAUTHENTICATED": "refused (give the router's API key with --api-key)",
            "NOT_FOUND": "unknown model (the router's /v1/models lists its names)"}
    return f"{what.get(code, code.lower())}: {message}"


def _host_port(url: str) -> tuple[str, int] | None:
    host, _, port = url.rpartition(":")
    return (host.strip("[]") or "127.0.0.1", int(port)) if port.isdigit() else None


def _reachable(url: str) -> bool:
    """Whether anything accepts TCP connections at host:port (unknown address forms count as reachable)."""
    address = _host_port(url)
    if address is None:
        return True
    try:
        with socket.create_connection(address, timeout=3):
            return True
    except OSError:
        return False
