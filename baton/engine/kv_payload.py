"""The output of a prefill: one request's keys and values for every layer, self-describing and portable.

Binary form (never pickle):  MAGIC (8 bytes) | header length (uint32, little endian) | header (UTF-8 JSON)
| raw tensor bytes of `kv` in C order. The header names every dimension, the dtype, the token ids, the first
sampled token and the fingerprint of the model that produced it, so a receiver can refuse KV it cannot use.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import torch

from baton.errors import PayloadError

MAGIC = b"BATONKV1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class KVPayload:
    request_id: str
    model_fingerprint: str
    prompt_ids: list[int]
    first_token: int
    kv: torch.Tensor  # [layers, 2 (key, value), kv_heads, tokens, head_dim]

    def __post_init__(self) -> None:
        if self.kv.dim() != 5 or self.kv.shape[1] != 2:
            raise PayloadError(
                f"kv must be [layers, 2, kv_heads, tokens, head_dim], got {tuple(self.kv.shape)}"
            )
        if self.kv.shape[3] != len(self.prompt_ids):
            raise PayloadError(f"kv holds {self.kv.shape[3]} tokens but prompt has {len(self.prompt_ids)}")
        if self.kv.dtype not in DTYPE_NAMES:
            raise PayloadError(f"unsupported kv dtype {self.kv.dtype}")

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
    def dtype(self) -> torch.dtype:
        return self.kv.dtype

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def header(self) -> dict[str, object]:
        return {
            "request_id": self.request_id,
            "model_fingerprint": self.model_fingerprint,
            "num_layers": self.num_layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "num_tokens": self.num_tokens,
            "dtype": DTYPE_NAMES[self.dtype],
            "prompt_ids": self.prompt_ids,
            "first_token": self.first_token,
        }

    def to_bytes(self) -> bytes:
        header = json.dumps(self.header(), separators=(",", ":")).encode()
        raw = self.kv.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
        return MAGIC + struct.pack("<I", len(header)) + header + raw

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> KVPayload:
        buf = memoryview(data)
        if len(buf) < len(MAGIC) + 4 or bytes(buf[: len(MAGIC)]) != MAGIC:
            raise PayloadError("not a Baton KV payload (bad magic)")
        (hlen,) = struct.unpack_from("<I", buf, len(MAGIC))
        start = len(MAGIC) + 4
        try:
            h = json.loads(bytes(buf[start : start + hlen]))
            dtype = DTYPES[h["dtype"]]
            shape = (int(h["num_layers"]), 2, int(h["kv_heads"]), int(h["num_tokens"]), int(h["head_dim"]))
        except (ValueError, KeyError, TypeError) as e:
            raise PayloadError(f"bad KV payload header: {e}") from e
        body = buf[start + hlen :]
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if len(body) != expected:
            raise PayloadError(f"KV payload body has {len(body)} bytes, header says {expected}")
        kv = torch.frombuffer(bytearray(body), dtype=torch.uint8).view(dtype).reshape(shape)
        return cls(
            request_id=str(h["request_id"]),
            model_fingerprint=str(h["model_fingerprint"]),
            prompt_ids=[int(t) for t in h["prompt_ids"]],
            first_token=int(h["first_token"]),
            kv=kv,
        )

    def check_compatible(self, fingerprint: str, num_layers: int, kv_heads: int, head_dim: int) -> None:
        """Raise PayloadError unless this payload was made by the model described by the arguments."""
        if self.model_fingerprint != fingerprint:
            raise PayloadError(
                f"KV payload comes from model {self.model_fingerprint[:12]}, this worker serves {fingerprint[:12]}"
            )
        got = (self.num_layers, self.kv_heads, self.head_dim)
        if got != (num_layers, kv_heads, head_dim):
            raise PayloadError(
                f"KV payload shape (layers, kv_heads, head_dim)={got}, expected "
                f"{(num_layers, kv_heads, head_dim)}"
            )
