"""Baton's CPU decode-attention kernel (baton/engine/csrc/decode_attention.cpp) against PyTorch's CPU flash kernel
and a plain read of the same keys and values, over 30 layers' distinct KV (as in a batch), 40% of each window
padding. Needs g++, ninja and an AVX-512 CPU; builds in ~30 s the first time (baton/engine/cpu_attention.py).

    .venv/bin/python scripts/decode_attention/bench.py
"""

import time

import torch
import torch.nn.functional as F

from baton.engine.cpu_attention import CpuAttention, decode_kernel

torch.set_num_threads(2)
KV_HEADS, REP, D, LAYERS, SCALE = 3, 3, 64, 30, 0.125  # smollm2-135m
attend = decode_kernel(CpuAttention.KERNEL, torch.float32, torch.device("cpu"), D, REP)
assert attend is not None


def measure(n: int, w: int) -> None:
    slabs = [torch.randn(2, n, KV_HEADS, w + 64, D) for _ in range(LAYERS)]  # a slab's window: columns [0, w)
    q = torch.randn(n, KV_HEADS, REP, D)
    valid = torch.rand(n, w) > 0.4
    valid[:, -1] = True
    mask = valid.view(n, 1, 1, w)
    cols = torch.zeros(n, w + 64, dtype=torch.bool)
    cols[:, :w] = valid

    def flash(k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=SCALE)

    def kernel(k, v):
        return attend(q, k, v, cols[:, :w], SCALE)[0]

    def read(k, v):
        return k.sum() + v.sum()

    best = {}
    for name, f in (("flash", flash), ("kernel", kernel), ("read", read)):
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            for s in slabs:
                f(s[0, :, :, :w], s[1, :, :, :w])
            times.append(time.perf_counter() - t0)
        best[name] = min(times[1:])
    k0, v0 = slabs[0][0, :, :, :w], slabs[0][1, :, :, :w]
    out, lse = attend(q, k0, v0, cols[:, :w], SCALE)
    scores = (q @ k0.transpose(-1, -2)) * SCALE + torch.zeros(n, 1, 1, w).masked_fill(~mask, float("-inf"))
    print(f"{n} rows, {w} columns: flash {best['flash'] * 1e3:.1f} ms, kernel {best['kernel'] * 1e3:.1f} ms "
          f"({best['flash'] / best['kernel']:.2f}x), plain read {best['read'] * 1e3:.1f} ms; "
          f"max |out - flash| {(out - flash(k0, v0)).abs().max():.1e}, "
          f"max |lse - logsumexp| {(lse - torch.logsumexp(scores, -1)).abs().max():.1e}")


for rows, columns in ((4, 512), (8, 1024), (32, 512), (32, 768)):
    measure(rows, columns)
