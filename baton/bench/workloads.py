"""Named, seeded benchmark workloads: what requests arrive, when, with how long a prompt and how many outputs.

A workload is a `WorkloadSpec` (its parameters) drawn into a list of `BenchRequest`s. Prompts are windows of
consecutive tokens cut from a real English corpus (the public-domain texts in `data/`, see its README)
tokenized with the model's tokenizer; a model without a tokenizer gets random token ids instead. Every request
asks for exactly its drawn number of output tokens (the runners ignore EOS), so all policies do the same work.

The same seed draws the same prompts and output lengths for every workload name that shares the length
parameters: `poisson` is `mixed` plus arrival times.
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
    rate: float | None  # Poisson arrivals at this many requests/s; None: all arrive at t=0
    seed: int = 0

    def __post_init__(self) -> None:
        def check(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"workload {self.name!r}: {what}")

        check(self.num_requests >= 1, "num_requests must be >= 1")
        check(1 <= self.prompt_min <= self.prompt_max, "need 1 <= prompt_min <= prompt_max")
        check(1 <= self.output_min <= self.output_max, "need 1 <= output_min <= output_max")
        check(self.max_batch >= 1, "max_batch must be >= 1")
        check(self.rate is None or self.rate > 0, "rate must be > 0 requests/s")

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
}


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


def draw(spec: WorkloadSpec, tokenizer: Any = None, vocab_size: int | None = None) -> list[BenchRequest]:
    """Draw the requests of `spec`: the same spec (seed included) and tokenizer give the same requests.
    Without a tokenizer, prompts are random ids below `vocab_size`."""
    rng = random.Random(spec.seed)
    n = spec.num_requests
    prompt_lens = [rng.randint(spec.prompt_min, spec.prompt_max) for _ in range(n)]
    output_lens = [rng.randint(spec.output_min, spec.output_max) for _ in range(n)]
    prompts: list[tuple[int, ...]] = []
    if tokenizer is not None:
        tokens = corpus_tokens(tokenizer)
        for length in prompt_lens:
            start = rng.randrange(len(tokens))
            window = (tokens[start:] + tokens * (1 + length // len(tokens)))[:length]  # wraps around the end
            prompts.append(tuple(window))
    else:
        if not vocab_size or vocab_size < 1:
            raise ValueError("a model without a tokenizer needs vocab_size for random prompts")
        prompts = [tuple(rng.randrange(vocab_size) for _ in range(length)) for length in prompt_lens]
    arrivals = [0.0] * n
    if spec.rate is not None:
        t = 0.0
        for i in range(n):
            t += rng.expovariate(spec.rate)
            arrivals[i] = t
    return [BenchRequest(i, prompts[i], output_lens[i], arrivals[i]) for i in range(n)]
