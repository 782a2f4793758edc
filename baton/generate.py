"""`baton generate`: send one prompt to a running Baton (e.g. `baton serve`) and print the completion.

    baton generate "The capital of France is"
    baton generate --stream --max-new-tokens 200 --temperature 0.7 --seed 1 "Once upon a time"
    baton generate --chat "Write a haiku about trains."
    echo "A long prompt" | baton generate -

The prompt goes to the router's gRPC API (--url). With --chat it is sent as one user message, to which the
router applies the model's chat template: that goes through the router's OpenAI-compatible HTTP API
(--http-url), as the gRPC API takes text or token ids only. Exit status 1, with the reason on stderr, when the
request fails or Baton cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from baton.flags import env_default

DEFAULT_URL = "127.0.0.1:50051"
DEFAULT_HTTP_PORT = 8000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt ('-': read it from stdin)")
    p.add_argument("--url", default=env_default("url", DEFAULT_URL),
                   help=f"the router's gRPC address, host:port (default: {DEFAULT_URL})")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message, with the model's chat template (uses the HTTP API)")
    p.add_argument("--http-url", default=env_default("http_url"),
                   help=f"the router's HTTP API, for --chat (default: http://<host of --url>:{DEFAULT_HTTP_PORT})")
    p.add_argument("--max-new-tokens", type=int, default=int(env_default("max_new_tokens", "128") or 128),
                   help="tokens to generate at most (default: 128)")
    p.add_argument("--temperature", type=float, default=float(env_default("temperature", "0") or 0),
                   help="0: greedy (the default)")
    p.add_argument("--top-p", type=float, default=float(env_default("top_p", "1") or 1))
    p.add_argument("--seed", type=int, default=_optional_int(env_default("seed")),
                   help="makes a sampled completion reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop before this string (may be repeated)")
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
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                                "top_p": args.top_p, "seed": args.seed, "stop": args.stop}
    t0 = time.perf_counter()
    try:
        finish, usage = (_chat if args.chat else _generate)(args, prompt, sampling)
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
def _generate(args: argparse.Namespace, prompt: str, sampling: dict[str, Any]) -> tuple[str, tuple[int, int]]:
    import grpc

    from baton.client import BatonClient, BatonError

    try:
        with BatonClient(args.url, timeout=args.timeout, api_key=args.api_key) as client:
            model = args.model_name or ""
            if not args.stream:
                c = client.generate(prompt, model=model, **sampling)
                _write(c.text)
                return c.finish_reason, (c.prompt_tokens, c.completion_tokens)
            finish, usage = "", (0, 0)
            for chunk in client.stream(prompt, model=model, **sampling):
                _write(chunk.text)
                if chunk.finish_reason is not None:
                    finish, usage = chunk.finish_reason, (chunk.prompt_tokens, chunk.completion_tokens)
            return finish, usage
    except BatonError as e:
        if e.code is grpc.StatusCode.UNAVAILABLE and not _reachable(args.url):
            raise Failed(f"cannot reach Baton at {args.url} ({e.message}). Is it running? Start it with "
                         "`baton serve`, or give its address with --url.") from None
        raise Failed(_describe(e.code.name, e.message)) from None


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


# ---- HTTP, for --chat ------------------------------------------------------------------------------------
def _chat(args: argparse.Namespace, prompt: str, sampling: dict[str, Any]) -> tuple[str, tuple[int, int]]:
    base = args.http_url
    if not base:
        address = _host_port(args.url)
        base = f"http://{address[0] if address else '127.0.0.1'}:{DEFAULT_HTTP_PORT}"
    base = base.rstrip("/").removesuffix("/v1")
    body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}],
                            "max_tokens": sampling["max_new_tokens"], "temperature": sampling["temperature"],
                            "top_p": sampling["top_p"], "stream": args.stream}
    if args.model_name:  # else the router's model
        body["model"] = args.model_name
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    if sampling["seed"] is not None:
        body["seed"] = sampling["seed"]
    if sampling["stop"]:
        body["stop"] = sampling["stop"]
    headers = {"Content-Type": "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as resp:
            return _read_stream(resp) if args.stream else _read_whole(json.load(resp))
    except urllib.error.HTTPError as e:
        raise Failed(_http_error(e)) from None
    except (urllib.error.URLError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise Failed(f"cannot reach Baton's HTTP API at {base} ({reason}). Is it running? Start it with "
                     "`baton serve`, or give its address with --http-url.") from None


def _read_whole(obj: dict[str, Any]) -> tuple[str, tuple[int, int]]:
    _write(obj["choices"][0]["message"]["content"] or "")
    usage = obj.get("usage") or {}
    return obj["choices"][0]["finish_reason"], (usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))


def _read_stream(resp: Any) -> tuple[str, tuple[int, int]]:
    finish, usage = "", (0, 0)
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        obj = json.loads(data)
        if "error" in obj:
            raise Failed(obj["error"].get("message", "the stream failed"))
        for choice in obj.get("choices", []):
            _write(choice.get("delta", {}).get("content") or "")
            finish = choice.get("finish_reason") or finish
        if obj.get("usage"):
            usage = (obj["usage"]["prompt_tokens"], obj["usage"]["completion_tokens"])
    return finish, usage


def _http_error(e: urllib.error.HTTPError) -> str:
    try:
        message = json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = e.reason
    code = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
            503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
    return _describe(code.get(e.code, f"HTTP {e.code}"), str(message))
