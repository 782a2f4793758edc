"""Per-request sampling of the next token from a batch's logits.

Each request carries its own parameters. A seeded request draws its k-th token from a generator seeded by
(seed, k) alone, so its output does not depend on which other rows share the batch, nor on which process
(prefill or decode worker) samples the token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from baton.engine.request import Request

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant used to spread (seed, step) over the generator's seed space


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


def sample_row(logits: torch.Tensor, req: Request) -> int:
    """Next token for one request. logits: [vocab] (float)."""
    p = req.params
    logits = logits.float()
    if p.repetition_penalty != 1.0:
        logits = _apply_repetition_penalty(logits, req.all_ids, p.repetition_penalty)
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


def sample(logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
    """Next token for each row. logits: [rows, vocab]; row i belongs to requests[i]."""
    assert logits.shape[0] == len(requests)
    simple = [r.params.greedy and r.params.repetition_penalty == 1.0 for r in requests]
    tokens: list[int] = logits.argmax(-1).tolist() if any(simple) else [0] * len(requests)
    for i, req in enumerate(requests):
        if not simple[i]:
            tokens[i] = sample_row(logits[i], req)
    return tokens
