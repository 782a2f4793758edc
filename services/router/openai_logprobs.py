"""Log-probabilities in OpenAI's two shapes, built from the engine's TokenLogprobs (baton/engine/logprobs.py: the
model's raw distribution, as vLLM reports it by default).

- /v1/completions (`logprobs: k`): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, one entry per
  token, the echoed prompt's first (its first token has null logprob and null top_logprobs). `top_logprobs` maps
  token text to logprob for the k most likely tokens and, as OpenAI documents, always the chosen one too (so up
  to k + 1 entries). `text_offset` is each token's character offset in the choice's text.
- /v1/chat/completions (`logprobs: true, top_logprobs: k`): `{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [{"token", "logprob", "bytes"}]}], "refusal": null}`.

Streamed, each chunk carries the entries of its own tokens (and offsets that continue from the chunk before).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from baton.engine.logprobs import TokenLogprobs
from services.router.text import TokenTexts


class CompletionLogprobs:
    """The completions shape, built chunk by chunk: it keeps the text offset reached so far."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts, self.offset = texts, 0

    def part(self, tokens: Sequence[int], lps: Sequence[TokenLogprobs | None]) -> dict[str, Any]:
        """The entries of these tokens; lps[i] None: a prompt's first token, which has no logprob."""
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, lp in zip(tokens, lps, strict=True):
            text = self.texts.text(tok)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if lp is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self.texts.text(t): v for t, v in lp.top}
            top.setdefault(text, lp.logprob)  # the chosen token is always listed
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append(top)
        return out

    @staticmethod
    def join(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Parts of one choice, in order, as one."""
        keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        return {k: [x for p in parts for x in p[k]] for k in keys}


def chat_logprobs(texts: TokenTexts, lps: Sequence[TokenLogprobs]) -> dict[str, Any]:
    """The chat shape for these tokens."""

    def entry(token: int, value: float) -> dict[str, Any]:
        return {"token": texts.text(token), "logprob": value, "bytes": list(texts.bytes(token))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps],
            "refusal": None}
