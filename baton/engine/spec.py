"""What a model is to every process that serves it, and the two checks made against it: `ModelSpec`.

It is built from the model's config alone (`from_config`), so the router, which loads no weights, has the same
description as the workers (`LoadedModel.spec`). `check_request` is the one check that a request fits the model
(context and vocabulary), made by the HTTP API, the router, the prefill worker and the engine alike;
`check_kv` is the one check that a KV payload can be spliced for a request (the model that computed it, its
shape, the tokens it covers), made by a decode worker as soon as a push's header arrives and by the engine
before any splice. Neither imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from baton.errors import InvalidRequestError, PayloadError

DEFAULT_CONTEXT = 2048  # for a config that names no context length


def _is_token(t: object, vocab_size: int) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size


@dataclass(frozen=True)
class ModelSpec:
    max_context: int  # prompt + generated tokens, at most
    vocab_size: int
    num_layers: int
    kv_heads: int  # key/value heads per layer (fewer than query heads under GQA)
    head_dim: int

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        """From a transformers config (Llama-style or GPT-2-style names)."""
        max_context = next(
            (int(getattr(config, k)) for k in ("max_position_embeddings", "n_positions") if getattr(config, k, None)),
            DEFAULT_CONTEXT,
        )
        heads = int(config.num_attention_heads)
        return cls(
            max_context=max_context,
            vocab_size=int(config.vocab_size),
            num_layers=int(config.num_hidden_layers),
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
        )

    @property
    def kv_dims(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim): the shape of one token's KV, less its 2 (key, value)."""
        return self.num_layers, self.kv_heads, self.head_dim

    def batch_kv_tokens(self, max_batch: int) -> int:
        """The KV tokens a batch of `max_batch` rows is sized for unless told: each row up to the model's context
        or 2,048 tokens, whichever is less (a decode worker's --max-kv-tokens, the slabs' default reserve)."""
        return max_batch * min(self.max_context, 2048)

    def check_request(self, prompt_ids: Sequence[int], max_new_tokens: int, output_ids: Sequence[int] = (),
                      token_fields: Mapping[str, Sequence[int]] | None = None, prompt_field: str = "prompt") -> None:
        """Raise InvalidRequestError naming the field unless the request fits the model: prompt + max_new_tokens
        within its context, and every token id (prompt, a resumed request's output so far, and the sampling
        fields that name tokens: SamplingParams.token_fields) inside its vocabulary."""
        n, ctx, vocab = len(prompt_ids), self.max_context, self.vocab_size
        if n >= ctx:
            raise InvalidRequestError(prompt_field, f"{n} tokens leave no room to generate in the model's context "
                                                    f"of {ctx}")
        if n + max_new_tokens > ctx:
            raise InvalidRequestError("max_new_tokens", f"the prompt ({n} tokens) + {max_new_tokens} new tokens "
                                                        f"exceeds the model's context of {ctx} tokens")
        for name, ids in ((prompt_field, prompt_ids), ("output_ids", output_ids), *(token_fields or {}).items()):
            bad = [t for t in ids if not _is_token(t, vocab)]
            if bad:
                raise InvalidRequestError(name, f"token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def check_kv(self, fingerprint: str, expected_fingerprint: str, dims: tuple[int, int, int],
                 token_ids: Sequence[int], expected_ids: Sequence[int], first_token: int) -> None:
        """Raise PayloadError unless KV so described (computed by the model `fingerprint`, of shape `dims`, for
        `token_ids`, with `first_token` sampled after them) is what a request over `expected_ids` on the model
        `expected_fingerprint` needs."""
        if fingerprint != expected_fingerprint:
            raise PayloadError(f"KV payload comes from model {fingerprint[:12]}, this worker serves "
                               f"{expected_fingerprint[:12]}")
        if tuple(dims) != self.kv_dims:
            raise PayloadError(f"KV payload shape (layers, kv_heads, head_dim)={tuple(dims)}, expected {self.kv_dims}")
        if list(token_ids) != list(expected_ids):  # a resumed request's KV covers its tokens so far too
            raise PayloadError("KV payload was computed for a different prompt")
        if not _is_token(first_token, self.vocab_size):  # the next step's input: out of range, it fails the batch
            raise PayloadError(f"KV payload's first token {first_token} is outside the vocabulary "
                               f"[0, {self.vocab_size})")
