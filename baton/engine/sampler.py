"""Per-request sampling of the next token from a batch's logits.

Each request carries its own parameters, applied in this order to its row's logits alone (so rows with different
controls share one batch): repetition penalty, presence and frequency penalties (over its output so far),
logit_bias, min_tokens (end-of-sequence and stop tokens masked until then), the response_format's grammar (only
the tokens it allows next: grammar.py); then greedy argmax, or temperature,
top-k, top-p and a draw. Log-probabilities are taken from the raw logits, before any of this (logprobs.py).

A seeded request draws its k-th token from a generator seeded by (seed, k) alone, so its output does not depend
on which other rows share the batch, nor on which process (prefill or decode worker) samples the token.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from baton.engine import logprobs
from baton.engine.grammar import Grammars, apply_mask
from baton.engine.logprobs import TokenLogprobs
from baton.engine.request import Request
from baton.errors import InvalidRequestError

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant used to spread (seed, step) over the generator's seed space


MAX_CHOICES = 16  # choices (n) one request may ask for


def check_choices(n: object) -> int:
    """`n`, the choices a request asks for, if it is 1 to MAX_CHOICES; else InvalidRequestError naming `n`."""
    if not (isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CHOICES):
        raise InvalidRequestError("n", f"must be 1 to {MAX_CHOICES}")
    return n


_CHOICE_MIX = 0xD1B54A32D192ED03  # spreads a choice's index over the seed space


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a request seeded `seed` (n > 1): choice 0 samples as the request alone would,
    the others on streams of their own, the same on every run and whatever else shares the batch."""
    if seed is None or index == 0:
        return seed
    return (seed ^ (index * _CHOICE_MIX)) % (2**63)


def _generator_for(req: Request, device: torch.device) -> torch.Generator | None:
    if req.params.seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed((req.params.seed * _MIX + len(req.output_ids)) % (2**63))
    return g


def _apply_repetition_penalty(logits: torch.Tensor, token_ids: list[int], penalty: float) -> torch.Tensor:
    # logits: [vocab]. Same rule as transformers' RepetitionPenaltyLogitsProcessor.
    ids = torch.tensor(sorted(set(token_ids)), device=logits.device, dtype=torch.long)
    scores = logits.gather(0, ids)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(0, ids, scores)


def _apply_penalties(logits: torch.Tensor, output_ids: list[int], presence: float, frequency: float) -> torch.Tensor:
    # logits: [vocab]. OpenAI's rule: logit -= presence * (count > 0) + frequency * count, over the output so far.
    if not output_ids:
        return logits
    counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.shape[-1])
    counts = counts[: logits.shape[-1]].to(logits.dtype)  # [vocab]
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def _mask(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    return logits.index_fill(0, torch.tensor(ids, dtype=torch.long, device=logits.device), float("-inf"))


def process(logits: torch.Tensor, req: Request, eos_ids: Collection[int] = (),
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """The row's logits after the request's penalties, biases, min_tokens and grammar `mask` (module docstring);
    a new tensor when any applies, never the caller's changed. logits: [vocab] (float)."""
    p = req.params
    if p.repetition_penalty != 1.0:
        logits = _apply_repetition_penalty(logits, req.all_ids, p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        logits = _apply_penalties(logits, req.output_ids, p.presence_penalty, p.frequency_penalty)
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=logits.device)
        bias = torch.tensor([b for _, b in p.logit_bias], dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(0, ids, bias)
    if len(req.output_ids) < p.min_tokens:
        ends = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
        if ends:
            logits = _mask(logits, ends)
    if mask is not None:
        logits = apply_mask(logits, mask)
    return logits


def sample_row(logits: torch.Tensor, req: Request, eos_ids: Collection[int] = (),
               grammars: Grammars | None = None) -> int:
    """Next token for one request. logits: [vocab] (float). `grammars`: to mask a constrained request's row."""
    mask = None
    if req.constraint is not None and grammars is not None:
        mask = grammars.masks([req.constraint], logits.device)[0]
    return _draw(process(logits.float(), req, eos_ids, mask), req)


def _draw(logits: torch.Tensor, req: Request) -> int:
    """The token from a row's processed logits ([vocab]): greedy, or temperature, top-k, top-p and a draw."""
    p = req.params
    if p.greedy:
        return int(logits.argmax())
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cum = sorted_probs.cumsum(-1)
        drop = cum - sorted_probs > p.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=_generator_for(req, logits.device)))


def sample(logits: torch.Tensor, requests: Sequence[Request], eos_ids: Collection[int] = (),
           grammars: Grammars | None = None) -> list[int]:
    """Next token for each row. logits: [rows, vocab]; row i belongs to requests[i]. `grammars`: to mask the
    constrained rows (their masks computed together)."""
    assert logits.shape[0] == len(requests)
    simple = [r.params.greedy and not r.params.processes_logits for r in requests]
    tokens: list[int] = logits.argmax(-1).tolist() if any(simple) else [0] * len(requests)
    constrained = [i for i, r in enumerate(requests) if r.constraint is not None] if grammars is not None else []
    masks: dict[int, torch.Tensor] = {}
    if constrained:
        assert grammars is not None
        found = grammars.masks([requests[i].constraint for i in constrained], logits.device)  # type: ignore[misc]
        masks = dict(zip(constrained, found))  # row -> [ceil(vocab / 32)]
    for i, req in enumerate(requests):
        if not simple[i]:
            tokens[i] = _draw(process(logits[i].float(), req, eos_ids, masks.get(i)), req)
    return tokens


def with_logprobs(
    logits: torch.Tensor, requests: Sequence[Request], tokens: Sequence[int]
) -> list[TokenLogprobs | None]:
    """The logprobs of each row's chosen token, for the rows whose request asks (None for the others).
    logits: [rows, vocab], raw (logprobs.py)."""
    rows = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(requests)
    if rows:
        pick = logits[rows] if len(rows) < len(requests) else logits  # [asking rows, vocab]
        found = logprobs.of_rows(pick, [tokens[i] for i in rows], [requests[i].params.logprobs or 0 for i in rows])
        for i, lp in zip(rows, found):
            out[i] = lp
    return out
