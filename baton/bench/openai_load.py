"""`baton bench serve --api openai`: the same open-loop load as loadgen.py, sent to any OpenAI-compatible server
(vLLM, SGLang, TGI, Baton's own HTTP API) so that its numbers compare with Baton's over gRPC.

Each request is a streaming `POST /v1/completions` with the prompt as token ids, `max_tokens`, `temperature: 0`,
`ignore_eos: true` (vLLM's and Baton's extension), `stream: true` and `stream_options: {"include_usage": true}`,
sent with httpx; the server-sent events are read with httpx-sse. Timing, as loadgen.py does over gRPC:

- TTFT: from sending to the first chunk that carries text (or `token_ids`, where a server sends them);
- e2e: from sending to the chunk that carries the finish reason;
- output tokens: the final chunk's `usage.completion_tokens` (a chunk carries text, not a token count); no usage,
  or a count other than max_tokens (EOS is ignored), is an error;
- ITL: the gaps between chunks carrying text, each divided evenly among the tokens it delivered, as the gRPC path
  divides a gap among a message's tokens. The stream does not say how many tokens a chunk holds, so the first
  chunk counts as one token and the rest of usage.completion_tokens is shared as evenly as whole tokens allow
  among the later chunks, the longest gaps taking the odd ones (`spread_itl`). When every chunk holds one token
  (vLLM's and Baton's usual stream) this is exactly the gaps.

Conversations (the `chat` workload) need each answer's token ids for the next turn's prompt: the sender then asks
for them with `return_token_ids: true` (vLLM's extension, which Baton's HTTP API honours too) and reads each
chunk's `token_ids`.

HTTP errors are recorded per request as HTTP_<status> (with the server's message as the detail), an error event
inside the stream as STREAM_ERROR, a request past --request-timeout as DEADLINE_EXCEEDED (gRPC's name for it),
anything else by its exception's type. No retries.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from types import TracebackType
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from baton.bench.loadgen import LoadError, Outcome, Target
from baton.bench.workloads import BenchRequest

# httpx logs every request at INFO: thousands of lines in a benchmark
logging.getLogger("httpx").setLevel(logging.WARNING)

COMPLETIONS = "/v1/completions"
MODELS = "/v1/models"


def spread_itl(chunk_times: list[float], tokens: int) -> list[float]:
    """Inter-token latencies of a stream whose chunks carrying text arrived at `chunk_times` (ascending) and which
    produced `tokens` tokens in all: the first chunk holds one token; the other tokens - 1 are shared as evenly as
    whole tokens allow among the later chunks (the longest gaps take one more), and each gap is divided evenly
    among its chunk's tokens. One latency per token after the first; none when there is a single chunk. With more
    chunks than tokens (a server that splits a token's text), one latency per gap."""
    gaps = [b - a for a, b in zip(chunk_times, chunk_times[1:])]
    rest = tokens - 1
    if not gaps or rest <= 0:
        return []
    if rest < len(gaps):
        return gaps
    base, extra = divmod(rest, len(gaps))
    longest = set(sorted(range(len(gaps)), key=lambda i: (-gaps[i], i))[:extra])
    out: list[float] = []
    for i, gap in enumerate(gaps):
        n = base + (1 if i in longest else 0)
        out.extend([gap / n] * n)
    return out


def error_message(response: httpx.Response) -> str:
    """What an error response says: OpenAI's {"error": {"message"}}, TGI's {"error": "..."}, FastAPI's
    {"detail"}, or the start of its body."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err is not None:
            return str(err)
    text = response.text.strip()
    return text[:300] if text else response.reason_phrase


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def first_model(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> str:
    """The first model id `GET /v1/models` lists; LoadError saying why when there is none to be had."""
    where = base_url + MODELS
    try:
        async with httpx.AsyncClient(headers=_headers(api_key), timeout=timeout_s) as client:
            response = await client.get(where)
    except httpx.HTTPError as e:
        raise LoadError(f"cannot reach {where}: {type(e).__name__}: {e}") from None
    if response.status_code != 200:
        raise LoadError(f"GET {where}: HTTP {response.status_code}: {error_message(response)}")
    try:
        data = response.json()["data"]
        return str(data[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise LoadError(f"GET {where} lists no model (give one with --served-model): "
                        f"{response.text.strip()[:200]!r}") from None


class OpenAISender:
    """Sends benchmark requests to an OpenAI-compatible server (loadgen.Sender); an async context manager that
    holds one connection pool of `concurrency` connections, so open-loop arrivals never wait for a free one."""

    def __init__(self, target: Target, timeout_s: float | None, concurrency: int, token_ids: bool = False) -> None:
        if target.model is None:
            raise ValueError("the OpenAI API needs a model name (--served-model, or the first of /v1/models)")
        self.model = target.model
        self.timeout_s = timeout_s
        self.token_ids = token_ids  # ask for the answers' token ids (return_token_ids): conversations need them
        size = max(1, concurrency)
        self.client = httpx.AsyncClient(
            base_url=target.url, headers=_headers(target.api_key), timeout=httpx.Timeout(timeout_s),
            limits=httpx.Limits(max_connections=size, max_keepalive_connections=size))

    async def __aenter__(self) -> OpenAISender:
        await self.client.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.client.__aexit__(exc_type, exc, tb)

    def body(self, request: BenchRequest) -> dict[str, Any]:
        body = {"model": self.model, "prompt": list(request.prompt_ids), "max_tokens": request.max_new_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        return {**body, "return_token_ids": True} if self.token_ids else body

    async def send(self, request: BenchRequest, out: Outcome, sent: float) -> None:
        try:
            await asyncio.wait_for(self._stream(request, out, sent), self.timeout_s)
        except asyncio.TimeoutError:
            out.error, out.detail = "DEADLINE_EXCEEDED", f"no answer within {self.timeout_s:g} s (--request-timeout)"

    async def _stream(self, request: BenchRequest, out: Outcome, sent: float) -> None:
        chunk_times: list[float] = []
        usage: Any = None
        async with aconnect_sse(self.client, "POST", COMPLETIONS, json=self.body(request)) as source:
            response = source.response
            if response.status_code != 200:
                await response.aread()
                out.error, out.detail = f"HTTP_{response.status_code}", error_message(response)
                return
            async for event in source.aiter_sse():
                now = time.perf_counter()
                if event.data.strip() == "[DONE]":
                    break
                chunk = json.loads(event.data)
                if not isinstance(chunk, dict):
                    raise ValueError(f"not a JSON object: {event.data[:100]!r}")
                if "error" in chunk:
                    err = chunk["error"]
                    out.error = "STREAM_ERROR"
                    out.detail = str(err.get("message", err) if isinstance(err, dict) else err)
                    return
                choices = chunk.get("choices") or []
                if any(c.get("text") or c.get("token_ids") for c in choices):
                    if not chunk_times:
                        out.ttft_s = now - sent
                    chunk_times.append(now)
                for c in choices:
                    out.output_ids.extend(c.get("token_ids") or ())
                    if c.get("finish_reason") is not None:
                        out.finish_reason = str(c["finish_reason"])
                        out.e2e_s = now - sent
                if chunk.get("usage"):
                    usage = chunk["usage"]
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        if out.finish_reason is None:
            out.error, out.detail = "NO_FINISH", "the stream ended without a finish reason"
        elif out.finish_reason == "cancelled":
            out.error, out.detail = "CANCELLED", "the server ended the request (finish_reason 'cancelled')"
        elif not isinstance(tokens, int):
            out.error = "NO_USAGE"
            out.detail = "the stream ended without usage.completion_tokens (stream_options.include_usage)"
        else:
            out.output_tokens = tokens
            out.itl_s = spread_itl(chunk_times, tokens)
            if tokens != request.max_new_tokens:
                out.error = "TOKEN_COUNT_MISMATCH"
                out.detail = (f"asked for {request.max_new_tokens} tokens with ignore_eos, the server counted "
                              f"{tokens} (finish_reason {out.finish_reason!r}): does it honour ignore_eos?")
