"""Log-probabilities of tokens, as a request asks for them (SamplingParams.logprobs and .prompt_logprobs).

Which distribution: the model's own, log_softmax of its raw logits, before temperature, top-k/top-p, penalties,
logit_bias, min_tokens or a grammar change them (vLLM's default, `logprobs_mode=raw_logprobs`; OpenAI does not
say). So a token's logprob is what transformers computes for it from the same prompt and output, whatever the
request's sampling controls, and the prefill worker (a first token, the prompt's) and the decode worker (every
later token) give the same numbers for the same positions.

Shapes: logits [rows, vocab] in, one TokenLogprobs per row out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # top alternatives a request may ask for per position (OpenAI's limit)
_ROWS_PER_CHUNK = 256  # prompt positions turned into log-probabilities at once (a [chunk, vocab] float32 copy)


@dataclass(frozen=True)
class TokenLogprobs:
    """A chosen token's log-probability and the `top` most likely tokens at its position, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), at most MAX_LOGPROBS


def of_rows(logits: torch.Tensor, tokens: Sequence[int], top: Sequence[int]) -> list[TokenLogprobs]:
    """Row i's token tokens[i] with its top[i] alternatives. logits: [rows, vocab]."""
    if not len(tokens):
        return []
    out: list[TokenLogprobs] = []
    for a in range(0, len(tokens), _ROWS_PER_CHUNK):
        lp = torch.log_softmax(logits[a : a + _ROWS_PER_CHUNK].float(), dim=-1)  # [chunk, vocab]
        ids = torch.tensor(tokens[a : a + _ROWS_PER_CHUNK], device=lp.device).unsqueeze(1)  # [chunk, 1]
        chosen = lp.gather(1, ids)[:, 0].tolist()
        k = max(top[a : a + _ROWS_PER_CHUNK])
        best_lp, best_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())  # [chunk, k]
        best_lp_l, best_ids_l = best_lp.tolist(), best_ids.tolist()
        for j, (tok, value) in enumerate(zip(tokens[a : a + _ROWS_PER_CHUNK], chosen)):
            n = top[a + j]
            out.append(TokenLogprobs(int(tok), float(value), tuple(zip(best_ids_l[j][:n], best_lp_l[j][:n]))))
    return out


def of_prompt(logits: torch.Tensor, prompt_ids: Sequence[int], top: int) -> list[TokenLogprobs | None]:
    """Each prompt token's logprob given the tokens before it; the first has none (None). logits: [len, vocab],
    row i predicting position i + 1 (the last row predicts the first generated token and is not used here)."""
    rest = list(prompt_ids[1:])
    return [None, *of_rows(logits[: len(rest)], rest, [top] * len(rest))]
