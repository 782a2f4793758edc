"""KV payloads on the wire: a KvHeader, then raw tensor bytes in chunks, checked by length and CRC-32.

A payload that is truncated, corrupted (CRC), out of order or from another model (checked by the receiver
against its fingerprint) raises PayloadError and is never spliced. The header is checked as soon as it arrives
(its shape and dtype against total_bytes, and by the receiver's `check_header`), before any bytes are taken.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import AsyncIterable, Callable, Iterator

import torch

from baton.engine.kv_payload import DTYPE_NAMES, DTYPES, KVPayload
from baton.errors import PayloadError
from baton.rpc.convert import (
    logprobs_from_proto,
    logprobs_to_proto,
    prompt_logprobs_from_proto,
    prompt_logprobs_to_proto,
)
from baton.v1 import baton_pb2 as pb

CHUNK_BYTES = 2 << 20  # 2 MiB: far below gRPC's 4 MiB default message limit


def payload_messages(payload: KVPayload, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.PushKvRequest]:
    """The header, then the tensor bytes in chunks. kv: [layers, 2, kv_heads, tokens, head_dim]."""
    raw = memoryview(payload.kv.detach().contiguous().cpu().view(torch.uint8).numpy().data).cast("B")
    per_layer = max(1, len(raw) // max(1, payload.num_layers))
    header = pb.KvHeader(
        request_id=payload.request_id,
        model_fingerprint=payload.model_fingerprint,
        num_layers=payload.num_layers,
        kv_heads=payload.kv_heads,
        head_dim=payload.head_dim,
        num_tokens=payload.num_tokens,
        dtype=DTYPE_NAMES[payload.dtype],
        prompt_ids=payload.prompt_ids,
        first_token=payload.first_token,
        total_bytes=len(raw),
        crc32=zlib.crc32(raw),
        prompt_logprobs=prompt_logprobs_to_proto(payload.prompt_logprobs or []),
        held_tokens=payload.held_tokens,
    )
    if payload.first_logprobs is not None:
        header.first_logprobs.CopyFrom(logprobs_to_proto(payload.first_logprobs))
    yield pb.PushKvRequest(header=header)
    for off in range(0, len(raw), chunk_bytes):
        yield pb.PushKvRequest(
            chunk=pb.KvChunk(layer=off // per_layer, offset=off, data=bytes(raw[off : off + chunk_bytes]))
        )


def _check_header(h: pb.KvHeader) -> None:
    """The header describes a payload its own numbers agree on."""
    if h.dtype not in DTYPES:
        raise PayloadError(f"KV push has unknown dtype {h.dtype!r}")
    if h.num_tokens + h.held_tokens != len(h.prompt_ids):
        raise PayloadError(f"KV push header: num_tokens is {h.num_tokens} and held_tokens {h.held_tokens}, "
                           f"prompt_ids has {len(h.prompt_ids)}")
    shape = (h.num_layers, 2, h.kv_heads, h.num_tokens, h.head_dim)
    expected = math.prod(shape) * torch.empty((), dtype=DTYPES[h.dtype]).element_size()
    if expected != h.total_bytes:
        raise PayloadError(f"KV push header: shape {shape} of {h.dtype} is {expected} bytes, total_bytes says "
                           f"{h.total_bytes}")


async def payload_from_messages(
    messages: AsyncIterable[pb.PushKvRequest], check_header: Callable[[pb.KvHeader], None] | None = None
) -> KVPayload:
    """Reassemble and check a payload sent by payload_messages. `check_header` (the receiver's own checks, e.g.
    that it waits for this request's KV from this model) runs on the header before any chunk is taken."""
    header: pb.KvHeader | None = None
    buf = bytearray()
    async for msg in messages:
        if msg.HasField("header"):
            if header is not None:
                raise PayloadError("KV push carries two headers")
            header = msg.header
            if header.total_bytes > 64 << 30:
                raise PayloadError(f"KV push announces {header.total_bytes} bytes, more than any payload can be")
            _check_header(header)
            if check_header is not None:
                check_header(header)
            buf = bytearray()
        elif msg.HasField("chunk"):
            if header is None:
                raise PayloadError("KV chunk before the header")
            if msg.chunk.offset != len(buf):
                raise PayloadError(f"KV chunk at offset {msg.chunk.offset}, expected {len(buf)}")
            buf += msg.chunk.data
            if len(buf) > header.total_bytes:
                raise PayloadError("KV push carries more bytes than its header says")
        else:
            raise PayloadError("empty KV push message")
    if header is None:
        raise PayloadError("KV push without a header")
    if len(buf) != header.total_bytes:
        raise PayloadError(f"KV push truncated: {len(buf)} of {header.total_bytes} bytes")
    if zlib.crc32(buf) != header.crc32:
        raise PayloadError("KV push corrupted: checksum mismatch")
    dtype = DTYPES[header.dtype]  # _check_header made sure dtype and shape agree with total_bytes
    shape = (header.num_layers, 2, header.kv_heads, header.num_tokens, header.head_dim)
    kv = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)
    return KVPayload(
        request_id=header.request_id,
        model_fingerprint=header.model_fingerprint,
        prompt_ids=list(header.prompt_ids),
        first_token=header.first_token,
        kv=kv,
        first_logprobs=logprobs_from_proto(header.first_logprobs) if header.HasField("first_logprobs") else None,
        prompt_logprobs=prompt_logprobs_from_proto(header.prompt_logprobs),
        held_tokens=header.held_tokens,
    )
