"""Requests and their sampling parameters: the unit the scheduler moves between queues and batches."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from baton.engine.grammar import Constraint, Grammars, ResponseFormat
from baton.engine.logprobs import MAX_LOGPROBS, TokenLogprobs
from baton.errors import InvalidRequestError

MAX_LOGIT_BIAS = 300  # token ids one request may bias (OpenAI's limit)
MAX_TIMEOUT_S = 1e6  # the longest per-request timeout an API accepts (gRPC deadlines overflow far beyond it)


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, prompt not yet prefilled
    PREFILLED = "prefilled"  # KV computed, waiting to be spliced into the decode batch
    RUNNING = "running"  # a row of the decode batch
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0
    seed: int | None = None  # makes a sampled output independent of the batch it runs in
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # OpenAI's penalties on output tokens seen so far: presence once per token, frequency per occurrence
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), ids distinct
    min_tokens: int = 0  # no EOS or stop token before this many output tokens (stop strings still end it)
    # log-probabilities (logprobs.py): None is off; k gives the chosen token's and the k most likely tokens'
    logprobs: int | None = None  # of each output token
    prompt_logprobs: int | None = None  # of each prompt token but the first
    response_format: ResponseFormat | None = None  # structured output (grammar.py); None: free text

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise InvalidRequestError(name, what)

        check(
            _is_int(self.max_new_tokens) and 1 <= self.max_new_tokens < 2**32,
            "max_new_tokens",
            "must be an integer in [1, 2**32)",
        )
        check(
            _is_num(self.temperature) and 0.0 <= self.temperature <= 100.0,
            "temperature",
            "must be in [0, 100]",
        )
        check(_is_num(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        check(_is_int(self.top_k) and 0 <= self.top_k < 2**32, "top_k", "must be an integer in [0, 2**32)")
        check(
            _is_num(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 10.0,
            "repetition_penalty",
            "must be in (0, 10]",
        )
        check(
            self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
            "seed",
            "must be 0 <= seed < 2**63",
        )
        check(
            isinstance(self.stop, tuple)
            and all(isinstance(s, str) and s and is_unicode(s) for s in self.stop)
            and len(self.stop) <= 16,
            "stop",
            "must be at most 16 non-empty strings of valid Unicode",
        )
        check(
            isinstance(self.stop_token_ids, tuple)
            and all(_is_int(t) and 0 <= t < 2**32 for t in self.stop_token_ids),
            "stop_token_ids",
            "must be integers in [0, 2**32)",
        )
        check(isinstance(self.ignore_eos, bool), "ignore_eos", "must be a boolean")
        for name in ("presence_penalty", "frequency_penalty"):
            check(_is_num(getattr(self, name)) and -2.0 <= getattr(self, name) <= 2.0, name, "must be in [-2, 2]")
        check(
            isinstance(self.logit_bias, tuple)
            and len(self.logit_bias) <= MAX_LOGIT_BIAS
            and all(isinstance(e, tuple) and len(e) == 2 and _is_int(e[0]) and 0 <= e[0] < 2**32
                    and _is_num(e[1]) and -100.0 <= e[1] <= 100.0 for e in self.logit_bias)
            and len({e[0] for e in self.logit_bias}) == len(self.logit_bias),
            "logit_bias",
            f"must map at most {MAX_LOGIT_BIAS} distinct token ids to biases in [-100, 100]",
        )
        check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_new_tokens,
            "min_tokens",
            "must be an integer in [0, max_new_tokens]",
        )
        check(self.response_format is None or isinstance(self.response_format, ResponseFormat), "response_format",
              "must be a ResponseFormat")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            check(k is None or (_is_int(k) and 0 <= k <= MAX_LOGPROBS), name,
                  f"must be an integer in [0, {MAX_LOGPROBS}]")

    @property
    def processes_logits(self) -> bool:
        """Whether anything but temperature, top-k and top-p changes the logits before sampling (sampler.py)."""
        return bool(self.repetition_penalty != 1.0 or self.presence_penalty or self.frequency_penalty
                    or self.logit_bias or self.min_tokens or self.response_format)

    @property
    def token_fields(self) -> dict[str, list[int]]:
        """The fields that name token ids, with those ids (each must be in the model's vocabulary:
        ModelSpec.check_request)."""
        return {"stop_token_ids": list(self.stop_token_ids), "logit_bias": [t for t, _ in self.logit_bias]}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_unicode(s: str) -> bool:
    """Whether `s` can be encoded as UTF-8 (JSON can carry lone surrogates, which cannot)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN


@dataclass
class Request:
    """One generation request and everything produced for it so far."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = field(default_factory=time.perf_counter)
    output_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    # Set when a stop string ended the request: the output text before the stop string (Engine._finish_reason).
    stop_text: str | None = None
    # with params.logprobs: one per token of output_ids produced here (a resumed request's earlier ones are not)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # with params.prompt_logprobs: one per prompt token (None for the first), set with the first token
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    # with params.response_format: the grammar's state on this worker (Request.constrain), advanced per token
    constraint: Constraint | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise InvalidRequestError("prompt", "must not be empty")
        if not all(_is_int(t) and t >= 0 for t in self.prompt_ids):
            raise InvalidRequestError("input_ids", "must be non-negative integers")
        # A request built with output_ids resumes one that another worker started (see WorkerRequest.output_ids).
        if not all(_is_int(t) and t >= 0 for t in self.output_ids):
            raise InvalidRequestError("output_ids", "must be non-negative integers")
        if len(self.output_ids) >= self.params.max_new_tokens:
            raise InvalidRequestError("output_ids", "a resumed request must have fewer tokens than max_new_tokens")

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def constrain(self, grammars: Grammars) -> None:
        """With a response_format: this worker's grammar state for the request, over its output so far (once)."""
        if self.params.response_format is not None and self.constraint is None:
            self.constraint = grammars.constraint(self.params.response_format, self.output_ids)

    def finish(self, reason: FinishReason) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.finish_time = time.perf_counter()
