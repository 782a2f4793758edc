"""The output of a prefill: one request's keys and values for every layer, self-describing: it names the token
ids it covers, the first token sampled after them and the fingerprint of the model that produced it, so a
receiver can refuse KV it cannot use (ModelSpec.check_kv). On the wire it travels as baton/rpc/kv_transfer.py
cuts it: a header, then raw tensor bytes in chunks.

A payload may leave out its first `held_tokens` tokens' KV (`leave_out`): the decode worker it goes to holds them
in its prefix cache, so only the rest travels; that worker puts them back (`with_held`) before anything splices
it. Only a whole payload (held_tokens 0) is ever spliced, or one whose left-out tokens the splicer has at hand: a
decode worker's own selective iteration keeps its prefix-cache hit apart and splices both parts (selective.py,
segment.RowKV), so that a long cached prefix is not joined to the new tokens only to be copied again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from baton.engine.logprobs import TokenLogprobs
from baton.errors import PayloadError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class KVPayload:
    request_id: str
    model_fingerprint: str
    prompt_ids: list[int]
    first_token: int
    kv: torch.Tensor  # [layers, 2 (key, value), kv_heads, tokens, head_dim]
    first_logprobs: TokenLogprobs | None = None  # when the request asks for logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # when it asks for prompt_logprobs (first: None)
    held_tokens: int = 0  # leading tokens of prompt_ids whose KV is left out: kv covers prompt_ids[held_tokens:]

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise PayloadError(
                f"kv must be [layers, 2, kv_heads, tokens, head_dim], got {tuple(self.kv.shape)}"
            )
        if self.held_tokens < 0 or (self.held_tokens and self.held_tokens >= len(self.prompt_ids)):
            raise PayloadError(f"held_tokens is {self.held_tokens}: a payload carries at least its last token's KV")
        if self.kv.shape[3] != len(self.prompt_ids) - self.held_tokens:
            raise PayloadError(f"kv holds {self.kv.shape[3]} tokens but prompt has {len(self.prompt_ids)}"
                               + (f", {self.held_tokens} held" if self.held_tokens else ""))
        if self.kv.dtype not in DTYPE_NAMES:
            raise PayloadError(f"unsupported kv dtype {self.kv.dtype}")

    def leave_out(self, tokens: int) -> KVPayload:
        """This payload less its first `tokens` tokens' KV, which its receiver holds (a view: nothing copied)."""
        if self.held_tokens:
            raise PayloadError("the payload already leaves out held tokens")
        return replace(self, kv=self.kv[:, :, :, tokens:], held_tokens=tokens)

    def with_held(self, held: torch.Tensor) -> KVPayload:
        """The whole payload, given the KV of the tokens it left out (held [layers, 2, kv_heads, held_tokens,
        head_dim], from the receiver's prefix cache)."""
        expected = (*self.kv.shape[:3], self.held_tokens, self.kv.shape[4])
        if tuple(held.shape) != expected:
            raise PayloadError(f"held KV {tuple(held.shape)} does not complete a payload of {tuple(self.kv.shape)} "
                               f"less {self.held_tokens} tokens")
        return replace(self, kv=torch.cat([held.to(self.kv.dtype), self.kv], dim=3), held_tokens=0)

    @property
    def num_layers(self) -> int:
        return int(self.kv.shape[0])

    @property
    def kv_heads(self) -> int:
        return int(self.kv.shape[2])

    @property
    def num_tokens(self) -> int:
        return int(self.kv.shape[3])

    @property
    def head_dim(self) -> int:
        return int(self.kv.shape[4])

    @property
    def dims(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim), as ModelSpec.kv_dims."""
        return self.num_layers, self.kv_heads, self.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()
