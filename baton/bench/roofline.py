"""The memory floor of a decode step: the bytes it must read (every weight once, the batch's KV) at the memory
bandwidth measured on this device, so that a step far above its floor shows as launch- or overhead-bound.

The bandwidth is that of a large device-to-device copy (each byte read once and written once), the best of a
few repeats: what the device's memory actually delivers, not its data sheet.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from baton.engine.models import LoadedModel


def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> dict[str, Any]:
    """Copy `nbytes` from one buffer to another `repeats` times (after two untimed copies); GB/s counts the
    bytes read plus the bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.fill_(1)
    dst = torch.empty_like(src)
    cuda = device.type == "cuda"
    times: list[float] = []
    for i in range(repeats + 2):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            elapsed = time.perf_counter() - t0
        if i >= 2:
            times.append(elapsed)
    del src, dst
    moved = 2 * nbytes
    return {
        "method": "device-to-device copy (bytes read + bytes written)",
        "copy_bytes": nbytes,
        "repeats": repeats,
        "best_gb_per_s": moved / min(times) / 1e9,
        "median_gb_per_s": moved / statistics.median(times) / 1e9,
    }


def weight_bytes_per_step(model: Any) -> int:
    """Bytes of weights one decode step of `model` (a transformers causal LM) reads: every parameter once (a tied
    embedding counted once, as the output layer reads it whole), but not an untied input embedding, of which a
    step reads only its tokens' rows."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb
    return int(total if tied else total - emb.numel() * emb.element_size())


def kv_bytes(lm: LoadedModel, rows: int, context: int) -> int:
    """Bytes of keys and values a step over `rows` rows of `context` tokens reads."""
    return rows * context * lm.kv_bytes_per_token()


def floor(lm: LoadedModel, rows: int, context: int, gb_per_s: float) -> dict[str, float]:
    """The shortest a decode step can take at `gb_per_s`: its weights' and KV's bytes read once (in ms)."""
    w, kv = weight_bytes_per_step(lm.model), kv_bytes(lm, rows, context)
    return {
        "weight_bytes": float(w),
        "kv_bytes": float(kv),
        "weights_ms": 1e3 * w / (gb_per_s * 1e9),
        "floor_ms": 1e3 * (w + kv) / (gb_per_s * 1e9),
    }
