"""Named, seeded benchmark workloads: what requests arrive, when, with how long a prompt and how many outputs.

A workload is a `WorkloadSpec` (its parameters) drawn into a list of `BenchRequest`s. Prompts are windows of
consecutive tokens cut from a real English corpus (the public-domain texts in `data/`, see its README)
tokenized with the model's tokenizer; a model without a tokenizer gets random token ids instead. Every request
asks for exactly its drawn number of output tokens (the runners ignore EOS), so all policies do the same work.

The same seed draws the same prompts and output lengths for every workload name that shares the length
parameters: `poisson` is `mixed` plus arrival times.

Two workloads repeat themselves, as real traffic does: `shared-prefix` puts one long common prefix (a system
prompt, `shared_prefix` tokens) before every prompt; `chat` is conversations (`draw_conversations`): each shares
that system prompt, and has `turns` turns, a user turn of [prompt_min, prompt_max] tokens answered with
[output_min, output_max] tokens, each next turn sent after the previous answer ended, its prompt being the whole
conversation so far (loadgen.run_conversations).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    num_requests: int
    prompt_min: int  # prompt lengths are uniform on [prompt_min, prompt_max] tokens
    prompt_max: int
    output_min: int  # output lengths are uniform on [output_min, output_max] tokens
    output_max: int
    max_batch: int
    rate: float | None  # Poisson arrivals at this many requests/s (conversations/s for chat); None: all at t=0
    seed: int = 0
    shared_prefix: int = 0  # tokens of one common prefix (a system prompt) before every prompt
    turns: tuple[int, int] | None = None  # a conversation workload: turns per conversation, uniform on [min, max]

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"workload {self.name!r}: {what}")

        check(self.num_requests >= 1, "num_requests must be >= 1")
        check(1 <= self.prompt_min <= self.prompt_max, "need 1 <= prompt_min <= prompt_max")
        check(1 <= self.output_min <= self.output_max, "need 1 <= output_min <= output_max")
        check(self.max_batch >= 1, "max_batch must be >= 1")
        check(self.rate is None or self.rate > 0, "rate must be > 0 requests/s")
        check(self.shared_prefix >= 0, "shared_prefix must be >= 0")
        check(self.turns is None or 1 <= self.turns[0] <= self.turns[1], "need 1 <= turns min <= max")

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class BenchRequest:
    index: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float  # seconds after the start of the run

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


WORKLOADS: dict[str, WorkloadSpec] = {
    # 64 requests of mixed lengths, all at t=0: the shape where static batching wastes the most
    "mixed": WorkloadSpec("mixed", 64, 32, 384, 16, 192, max_batch=32, rate=None),
    # the same lengths arriving as a Poisson process (vary --rate)
    "poisson": WorkloadSpec("poisson", 64, 32, 384, 16, 192, max_batch=32, rate=1.0),
    # a few short requests, for tests
    "tiny": WorkloadSpec("tiny", 6, 4, 24, 2, 8, max_batch=4, rate=None),
    # one long common prefix (a system prompt of 1,024 tokens), short distinct suffixes and answers
    "shared-prefix": WorkloadSpec("shared-prefix", 64, 16, 64, 16, 64, max_batch=32, rate=None, shared_prefix=1024),
    # 32 conversations of 3 to 6 turns sharing a 300-token system prompt, arriving at 0.5 conversations/s
    "chat": WorkloadSpec("chat", 32, 20, 120, 32, 160, max_batch=32, rate=0.5, shared_prefix=300, turns=(3, 6)),
}


@dataclass(frozen=True)
class Conversation:
    index: int
    arrival_s: float  # when its first turn is sent (seconds after the start of the run)
    system: tuple[int, ...]  # the system prompt every conversation of the workload shares
    turns: tuple[tuple[tuple[int, ...], int], ...]  # each turn's user tokens and the answer's length


def get_workload(name: str, **overrides: Any) -> WorkloadSpec:
    """The named workload with some parameters replaced; an override of None keeps the default. For `mixed`
    and `tiny` a rate turns the all-at-once arrivals into Poisson arrivals."""
    if name not in WORKLOADS:
        raise ValueError(f"workload: unknown {name!r}, choose one of {sorted(WORKLOADS)}")
    fields = {f.name for f in dataclasses.fields(WorkloadSpec)} - {"name"}
    unknown = set(overrides) - fields
    if unknown:
        raise TypeError(f"unknown workload parameters: {sorted(unknown)}")
    return dataclasses.replace(WORKLOADS[name], **{k: v for k, v in overrides.items() if v is not None})


_CORPUS_CACHE: dict[int, tuple[Any, list[int]]] = {}


def corpus_text() -> str:
    files = sorted(DATA_DIR.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"benchmark corpus missing: no *.txt in {DATA_DIR}")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def corpus_tokens(tokenizer: Any) -> list[int]:
    """The corpus tokenized by `tokenizer` (cached per tokenizer object)."""
    hit = _CORPUS_CACHE.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    ids = list(tokenizer(corpus_text(), add_special_tokens=False, verbose=False)["input_ids"])
    _CORPUS_CACHE[id(tokenizer)] = (tokenizer, ids)
    return ids


class _Text:
    """Windows of the corpus (or random ids without a tokenizer), drawn from one random stream."""

    def __init__(self, rng: random.Random, tokenizer: Any, vocab_size: int | None) -> None:
        self.rng = rng
        self.tokens = corpus_tokens(tokenizer) if tokenizer is not None else None
        if self.tokens is None and (not vocab_size or vocab_size < 1):
            raise ValueError("a model without a tokenizer needs vocab_size for random prompts")
        self.vocab_size = vocab_size or 0

    def window(self, length: int) -> tuple[int, ...]:
        if self.tokens is None:
            return tuple(self.rng.randrange(self.vocab_size) for _ in range(length))
        start = self.rng.randrange(len(self.tokens))
        return tuple((self.tokens[start:] + self.tokens * (1 + length // len(self.tokens)))[:length])  # wraps


def draw(spec: WorkloadSpec, tokenizer: Any = None, vocab_size: int | None = None) -> list[BenchRequest]:
    """Draw the requests of `spec`: the same spec (seed included) and tokenizer give the same requests.
    Without a tokenizer, prompts are random ids below `vocab_size`. (A conversation workload's first turns;
    draw_conversations gives the whole conversations.)"""
    if spec.turns is not None:
        return [BenchRequest(c.index, c.system + c.turns[0][0], c.turns[0][1], c.arrival_s)
                for c in draw_conversations(spec, tokenizer, vocab_size)]
    rng = random.Random(spec.seed)
    n = spec.num_requests
    prompt_lens = [rng.randint(spec.prompt_min, spec.prompt_max) for _ in range(n)]
    output_lens = [rng.randint(spec.output_min, spec.output_max) for _ in range(n)]
    text = _Text(rng, tokenizer, vocab_size)
    prompts = [text.window(length) for length in prompt_lens]
    if spec.shared_prefix:
        prefix = _Text(random.Random(f"system-{spec.seed}"), tokenizer, vocab_size).window(spec.shared_prefix)
        prompts = [prefix + p for p in prompts]
    arrivals = [0.0] * n
    if spec.rate is not None:
        t = 0.0
        for i in range(n):
            t += rng.expovariate(spec.rate)
            arrivals[i] = t
    return [BenchRequest(i, prompts[i], output_lens[i], arrivals[i]) for i in range(n)]


def draw_conversations(spec: WorkloadSpec, tokenizer: Any = None, vocab_size: int | None = None) -> list[Conversation]:
    """The conversations of a conversation workload (`turns` set): the same spec and tokenizer give the same ones."""
    if spec.turns is None:
        raise ValueError(f"workload {spec.name!r} is not a conversation workload")
    rng = random.Random(spec.seed)
    text = _Text(rng, tokenizer, vocab_size)
    system = _Text(random.Random(f"system-{spec.seed}"), tokenizer, vocab_size).window(spec.shared_prefix)
    out = []
    t = 0.0
    for i in range(spec.num_requests):
        if spec.rate is not None:
            t += rng.expovariate(spec.rate)
        turns = tuple((text.window(rng.randint(spec.prompt_min, spec.prompt_max)),
                       rng.randint(spec.output_min, spec.output_max))
                      for _ in range(rng.randint(*spec.turns)))
        out.append(Conversation(i, t, system, turns))
    return out
