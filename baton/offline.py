"""`baton run`: a JSONL file of requests through the engine, offline.

Input, one JSON object a line: `id` (string) and exactly one of `prompt` (text), `messages` (a chat, to which
the model's chat template is applied) or `input_ids`; optionally the sampling fields of SamplingParams and
`arrival_s`, the request's arrival as an offset from the start of the run (to replay a trace).

Output, one line per input line and in the same order (blank lines are skipped): `id`, `text`, `token_ids`,
`finish_reason`, `prompt_tokens`, `completion_tokens`, `ttft_s` and `e2e_s` (both from the arrival); or, for
a line that cannot run, `{"id": ..., "error": {"line": N, "field": ..., "message": ...}}`, where `field` is
null when the line as a whole is at fault (not JSON, not an object).
"""

from __future__ import annotations

import argparse
import codecs
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import IO, Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from baton.engine.engine import POLICIES, Engine, StepOutput
from baton.engine.models import load_model
from baton.engine.request import Request, SamplingParams
from baton.engine.slab_pool import RESERVE_HELP, default_reserve
from baton.errors import InvalidRequestError

log = logging.getLogger(__name__)

PROMPT_FIELDS = ("prompt", "messages", "input_ids")
SAMPLING_FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop",
                   "stop_token_ids", "ignore_eos")
FIELDS = frozenset(("id", "arrival_s", *PROMPT_FIELDS, *SAMPLING_FIELDS))


@dataclass
class Parsed:
    """A request read from its JSON object, and when it arrives (seconds after the start of the run)."""

    request: Request
    arrival_s: float = 0.0


def parse_request(obj: dict[str, Any], tokenizer: PreTrainedTokenizerBase | None) -> Parsed:
    """Build a Request from one JSON object. Raises InvalidRequestError naming the field at fault; the
    engine's own limits (context, vocabulary) are checked by Engine.validate, not here."""
    unknown = sorted(set(obj) - FIELDS)
    if unknown:
        raise InvalidRequestError(unknown[0], "unknown field")
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise InvalidRequestError("id", "required, a non-empty string")
    given = [f for f in PROMPT_FIELDS if f in obj]
    if len(given) != 1:
        raise InvalidRequestError(given[1] if given else "prompt",
                                  "give exactly one of prompt, messages or input_ids")
    prompt_ids = _prompt_ids(given[0], obj[given[0]], tokenizer)

    params = {k: obj[k] for k in SAMPLING_FIELDS if k in obj}
    if isinstance(params.get("stop"), str):
        params["stop"] = [params["stop"]]
    for key in ("stop", "stop_token_ids"):
        if key in params:
            if not isinstance(params[key], list):
                raise InvalidRequestError(key, "must be a list")
            params[key] = tuple(params[key])
    arrival = obj.get("arrival_s", 0.0)
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not 0 <= arrival < math.inf:
        raise InvalidRequestError("arrival_s", "must be a number >= 0")
    return Parsed(Request(rid, prompt_ids, SamplingParams(**params)), float(arrival))


def _prompt_ids(name: str, value: Any, tokenizer: PreTrainedTokenizerBase | None) -> list[int]:
    if name == "input_ids":
        if not isinstance(value, list) or not value:
            raise InvalidRequestError(name, "must be a non-empty list of token ids")
        return value  # Request checks the ids themselves
    if tokenizer is None:
        raise InvalidRequestError(name, "this model has no tokenizer; give input_ids")
    if name == "prompt":
        if not isinstance(value, str) or not value:
            raise InvalidRequestError(name, "must be a non-empty string")
        return list(tokenizer.encode(value))
    if not (isinstance(value, list) and value
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)):
        raise InvalidRequestError(name, "must be a non-empty list of objects with a role and a content")
    try:
        text = tokenizer.apply_chat_template(value, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # the template itself decides what a chat may hold (jinja, ValueError ...)
        raise InvalidRequestError(name, f"chat template failed: {e}") from e
    return list(tokenizer.encode(text, add_special_tokens=False))  # the template wrote the special tokens


@dataclass
class LineError:
    field: str | None  # None: the line as a whole (not UTF-8, not JSON, not an object)
    message: str

    @classmethod
    def of(cls, e: InvalidRequestError) -> LineError:
        return cls(e.field, e.detail)  # the message without the field, which travels apart


@dataclass
class Line:
    """One input line: a request to run, or the error that stopped it."""

    number: int  # 1-based
    id: Any  # as given; None when missing or unreadable
    request: Request | None = None
    arrival_s: float = 0.0
    error: LineError | None = None

    @property
    def done(self) -> bool:
        return self.request is None or self.request.finished

    def result(self, engine: Engine) -> dict[str, Any]:
        if self.request is None:
            assert self.error is not None
            return {"id": self.id, "error": {"line": self.number, **asdict(self.error)}}
        req = self.request
        assert req.first_token_time is not None and req.finish_time is not None and req.finish_reason
        return {
            "id": req.id,
            "text": engine.text(req),
            "token_ids": req.output_ids,
            "finish_reason": req.finish_reason.value,
            "prompt_tokens": req.prompt_len,
            "completion_tokens": len(req.output_ids),
            "ttft_s": round(req.first_token_time - req.arrival_time, 6),
            "e2e_s": round(req.finish_time - req.arrival_time, 6),
        }


def parse_line(raw: bytes, number: int, engine: Engine) -> Line:
    """One input line as a request the engine accepts, or as the error that refuses it."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return Line(number, None, error=LineError(None, "not UTF-8"))
    except json.JSONDecodeError as e:
        return Line(number, None, error=LineError(None, f"not JSON: {e}"))
    if not isinstance(obj, dict):
        return Line(number, None, error=LineError(None, "not a JSON object"))
    try:
        parsed = parse_request(obj, engine.lm.tokenizer)
        engine.validate(parsed.request, "input_ids" if "input_ids" in obj else "prompt")
    except InvalidRequestError as e:
        return Line(number, obj.get("id"), error=LineError.of(e))
    return Line(number, parsed.request.id, parsed.request, parsed.arrival_s)


def run_lines(engine: Engine, raws: list[bytes], out: IO[str]) -> list[Line]:
    """Run every line's request; write the results to `out` in input order, each once the lines before it
    are done."""
    lines = [parse_line(raw, i, engine) for i, raw in enumerate(raws, 1) if raw.strip()]
    first: dict[str, int] = {}
    for line in lines:
        if line.request is not None and first.setdefault(line.request.id, line.number) != line.number:
            line.request, line.error = None, LineError("id", f"duplicate of line {first[line.id]}")
    todo = sorted((line for line in lines if line.request is not None), key=lambda line: line.arrival_s)
    t0 = time.perf_counter()
    for line in todo:
        assert line.request is not None
        line.request.arrival_time = t0 + line.arrival_s
        engine.add_request(line.request)

    written = 0

    def flush() -> None:
        nonlocal written
        while written < len(lines) and lines[written].done:
            out.write(json.dumps(lines[written].result(engine)) + "\n")
            written += 1
        out.flush()

    with tqdm(total=len(todo), unit="req", disable=not sys.stderr.isatty()) as bar:
        def on_step(step: StepOutput) -> None:
            if step.finished:
                bar.update(len(step.finished))
                flush()

        flush()
        engine.run_until_done(on_step)
    flush()
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from baton.flags import add_model_arguments, count_or_auto, env_default

    parser.add_argument("--input", required=True, help="requests, one JSON object a line ('-': stdin)")
    parser.add_argument("--output", required=True, help="results, one JSON object a line ('-': stdout)")
    parser.add_argument("--policy", choices=POLICIES, default=env_default("policy", "baton"))
    parser.add_argument("--max-batch", type=_positive_int, default=env_default("max_batch", "32"),
                        help="rows of the decode batch (default: 32)")
    parser.add_argument("--fuse-prefill", action="store_true",
                        help="baton: run prompts inside the batch's iteration (one forward pass with the running "
                             "rows' tokens) instead of in passes of their own")
    parser.add_argument("--kv-reserve-bytes", type=count_or_auto("bytes"),
                        default=env_default("kv_reserve_bytes", "auto"), help=RESERVE_HELP)
    add_model_arguments(parser)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, not {text!r}")
    return int(text)


def main(args: argparse.Namespace) -> int:
    try:
        if args.input == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(args.input, "rb") as f:
                data = f.read()
        # bytes split on \n, \r and \r\n only; str.splitlines would also split inside JSON strings (U+2028)
        raws = data.removeprefix(codecs.BOM_UTF8).splitlines()
        out: IO[str] = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
    except OSError as e:
        log.error("%s", e)
        return 1
    try:
        try:
            lm = load_model(args.model, args.device, args.dtype, args.cpu_gemm, args.cpu_attention)
        except (OSError, ValueError) as e:
            log.error("%s", e)
            return 1
        reserve = args.kv_reserve_bytes
        if reserve == "auto":
            reserve = default_reserve(lm.spec.batch_kv_tokens(args.max_batch), lm.kv_bytes_per_token())
        engine = Engine(lm, args.policy, max_batch=args.max_batch, fuse_prefill=args.fuse_prefill,
                        kv_reserve_bytes=int(reserve))
        t0 = time.perf_counter()
        lines = run_lines(engine, raws, out)
        elapsed = time.perf_counter() - t0
    finally:
        if out is not sys.stdout:
            out.close()
    refused = sum(line.request is None for line in lines)
    tokens = engine.stats.output_tokens
    log.info("%d requests run, %d refused; %d tokens in %.2f s (%.1f tokens/s)",
             len(lines) - refused, refused, tokens, elapsed, tokens / elapsed if elapsed else 0.0)
    return 0
