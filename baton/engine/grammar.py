"""Structured output: a request's `response_format` (JSON, or JSON matching a schema) enforced token by token.

The grammar library is llguidance (Microsoft; also a structured-output backend of vLLM and SGLang), chosen over
xgrammar and outlines-core because it is one small wheel with no dependencies (xgrammar brings Triton and a TVM
runtime), compiles a schema lazily as it is used (no per-schema compile step to cache), computes a row's token
mask in microseconds, and applies masks with plain torch ops that run on a CPU and a GPU alike.

How it works here: every worker that samples a constrained request's token (the prefill worker its first, the
decode worker the rest) holds a `Constraint` for it, an llguidance matcher advanced over the output so far (a
resumed request's too), so the workers agree on the state without shipping it. Before sampling, a constrained
row's logits are masked to the tokens the grammar allows next (sampler.py); rows without a format are untouched,
so constrained and free rows share one batch. When the grammar is complete the request ends with `stop` at once.
Log-probabilities stay the model's raw ones (logprobs.py).

`ResponseFormat` checks itself when made (the router's APIs, and every worker again): a schema llguidance cannot
enforce is refused with InvalidRequestError naming `response_format` and llguidance's reason.
"""

from __future__ import annotations

import enum
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from baton.errors import InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MAX_SCHEMA_CHARS = 64 << 10
# Compact JSON: no free whitespace between items, so a model cannot pad its output with blanks forever.
_JSON_STYLE: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class FormatKind(enum.Enum):
    JSON_OBJECT = "json_object"  # any JSON object
    JSON_SCHEMA = "json_schema"  # JSON valid against `schema`


@dataclass(frozen=True)
class ResponseFormat:
    kind: FormatKind
    schema: str = ""  # the JSON schema as JSON text (json_schema only)

    def __post_init__(self) -> None:
        if not isinstance(self.kind, FormatKind):
            raise InvalidRequestError("response_format", "type must be json_object or json_schema")
        if self.kind is FormatKind.JSON_OBJECT and self.schema:
            raise InvalidRequestError("response_format", "json_object takes no schema")
        if self.kind is FormatKind.JSON_SCHEMA:
            if not isinstance(self.schema, str) or len(self.schema) > MAX_SCHEMA_CHARS:
                raise InvalidRequestError("response_format", f"the schema must be JSON of at most {MAX_SCHEMA_CHARS} "
                                                             "characters")
            try:
                schema = json.loads(self.schema)
            except ValueError as e:
                raise InvalidRequestError("response_format", f"the schema is not JSON: {e}") from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequestError("response_format", "the schema must be a JSON object")
        error = llguidance.LLMatcher.validate_grammar(self.grammar)
        if error:
            raise InvalidRequestError("response_format", f"the schema cannot be enforced: {error}")

    @classmethod
    def json_schema(cls, schema: Any) -> ResponseFormat:
        """From a schema as parsed JSON (a dict)."""
        return cls(FormatKind.JSON_SCHEMA, json.dumps(schema, separators=(",", ":"), sort_keys=True))

    @classmethod
    def from_openai(cls, raw: Any) -> ResponseFormat | None:
        """OpenAI's `response_format` object: {"type": "text"} (None), {"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}."""
        if raw is None:
            return None
        kind = raw.get("type") if isinstance(raw, dict) else None
        if kind == "text" and set(raw) == {"type"}:
            return None
        if kind == "json_object" and set(raw) == {"type"}:
            return cls(FormatKind.JSON_OBJECT)
        if kind == "json_schema":
            spec = raw.get("json_schema")
            if set(raw) != {"type", "json_schema"} or not isinstance(spec, dict) or \
                    not isinstance(spec.get("schema"), dict):
                raise InvalidRequestError("response_format", 'json_schema needs {"json_schema": {"name": ..., '
                                                             '"schema": {...}}}')
            return cls.json_schema(spec["schema"])
        raise InvalidRequestError("response_format", 'must be {"type": "text"}, {"type": "json_object"} or '
                                                     '{"type": "json_schema", "json_schema": {...}}')

    @cached_property  # checked at construction, then used by every worker's Constraint: built once
    def grammar(self) -> str:
        """The format as an llguidance grammar."""
        schema: Any = {"type": "object"} if self.kind is FormatKind.JSON_OBJECT else json.loads(self.schema)
        return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_STYLE))


class Constraint:
    """One request's grammar state on one worker: which tokens may come next; advanced by each output token."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            log.warning("grammar refused token %d: %s", token, self.matcher.get_error())

    @property
    def complete(self) -> bool:
        """The output is a whole document of the format: nothing may follow (the request ends)."""
        return bool(self.matcher.is_stopped())

    @property
    def failed(self) -> bool:
        return bool(self.matcher.is_error())


class Grammars:
    """A model's grammar machinery: llguidance's view of its tokenizer (built on first use: about a second), and
    the masks of a batch's constrained rows. Thread-safe where it is shared (the tokenizer is built once)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase | None, vocab_size: int) -> None:
        self.hf_tokenizer, self.vocab_size = tokenizer, vocab_size
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | InvalidRequestError | None = None

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        """Built once. Raises InvalidRequestError (naming response_format) when the model's tokenizer cannot be
        used, every time."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build()
        if isinstance(self._tokenizer, InvalidRequestError):
            raise self._tokenizer
        return self._tokenizer

    def _build(self) -> llguidance.LLTokenizer | InvalidRequestError:
        if self.hf_tokenizer is None:
            return InvalidRequestError("response_format", "this model has no tokenizer: no structured output")
        try:
            return llguidance.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size)
        except (ValueError, TypeError, RuntimeError) as e:  # llguidance cannot read this tokenizer
            return InvalidRequestError("response_format", f"structured output does not support this model's "
                                                          f"tokenizer: {e}")

    @cached_property
    def _executor(self) -> llguidance.LLExecutor:
        return llguidance.LLExecutor()

    def constraint(self, fmt: ResponseFormat, output_ids: Sequence[int] = ()) -> Constraint:
        """A request's Constraint, advanced over its output so far (a resumed request's). Raises
        InvalidRequestError when the format cannot be enforced or the output already breaks it."""
        matcher = llguidance.LLMatcher(self.tokenizer, fmt.grammar)
        if matcher.is_error():
            raise InvalidRequestError("response_format", f"the schema cannot be enforced: {matcher.get_error()}")
        if output_ids and not matcher.consume_tokens(list(output_ids)):
            raise InvalidRequestError("output_ids", "the output so far does not follow the response_format")
        return Constraint(matcher)

    def masks(self, constraints: Sequence[Constraint], device: torch.device) -> torch.Tensor:
        """The allowed next tokens of each constraint, as llguidance's packed bitmask: [rows, ceil(vocab / 32)]."""
        bitmask = llguidance.torch.allocate_token_bitmask(len(constraints), self.tokenizer.vocab_size)
        if len(constraints) == 1:
            llguidance.torch.fill_next_token_bitmask(constraints[0].matcher, bitmask, 0)
        else:
            llguidance.torch.fill_next_token_bitmask_par(self._executor,
                                                          [(c.matcher, i) for i, c in enumerate(constraints)], bitmask)
        return bitmask.to(device)


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A copy of one row's logits ([vocab]) with the tokens outside `mask` ([ceil(vocab / 32)]) at -inf."""
    out = logits.clone()
    llguidance.torch.apply_token_bitmask_inplace(out, mask)  # views `out` as [1, vocab]
    return out
