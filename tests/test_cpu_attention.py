"""baton/engine/cpu_attention.py: Baton's CPU decode-attention kernel computes what the flash kernel does over the
columns a row attends, and the engine's greedy outputs through it equal generate() on each request alone.

The kernel needs an AVX-512 CPU, a compiler and ninja: where it cannot be had, the tests that run it are skipped
with the reason (the engine then runs the flash kernel, which the rest of the suite covers)."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from baton.bench.exactness import Case, engine_outputs, reference, staggered_cases
from baton.engine.attention import _attend_plain
from baton.engine.cpu_attention import CpuAttention, DecodeKernel, KernelUnavailable, decode_kernel
from baton.engine.models import LoadedModel

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def kernel() -> DecodeKernel:
    try:
        k = decode_kernel(CpuAttention.KERNEL, torch.float32, CPU, 64, 3)
    except KernelUnavailable as e:
        pytest.skip(str(e))
    assert k is not None
    return k


def tiny_llama_64(choice: CpuAttention) -> LoadedModel:
    """A random Llama with smollm2-135m's attention shape (head_dim 64, 3 query heads per KV head)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=384, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
                         eos_token_id=2, pad_token_id=2, bos_token_id=1)
    return LoadedModel(LlamaForCausalLM(config), None, "tiny-llama-64", cpu_attention=choice)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 5), kv_heads=st.integers(1, 3), rep=st.integers(1, 8), width=st.integers(1, 80),
       left=st.integers(0, 20), seed=st.integers(0, 2**16))
def test_the_kernel_attends_over_the_valid_columns_as_plain_attention_does(
        kernel: DecodeKernel, n: int, kv_heads: int, rep: int, width: int, left: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    slab = torch.randn(2, n, kv_heads, left + width + 7, 64, generator=g)  # a window [left, left + width) of it
    k, v = slab[0, :, :, left : left + width], slab[1, :, :, left : left + width]
    q = torch.randn(n, kv_heads, rep, 64, generator=g)
    valid_slab = torch.rand(n, left + width + 7, generator=g) > 0.4
    valid_slab[:, left + width - 1] = True  # every row attends at least its own newest column
    valid = valid_slab[:, left : left + width]
    out, lse = kernel(q, k, v, valid, 0.125)
    bias = torch.zeros(n, 1, 1, width).masked_fill(~valid[:, None, None, :], float("-inf"))
    want, want_lse = _attend_plain(q.double(), k.double(), v.double(), bias.double(), 0.125)
    assert out.shape == (n, kv_heads, rep, 64) and lse.shape == (n, kv_heads, rep)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=2e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=2e-6)


def test_greedy_outputs_through_the_kernel_equal_generate_alone(kernel: DecodeKernel) -> None:
    lm = tiny_llama_64(CpuAttention.KERNEL)
    assert lm.decode_kernel is kernel
    cases = staggered_cases(lm.spec.vocab_size, 10, 90, 24, seed=3)
    assert engine_outputs(lm, "baton", cases, max_batch=4) == [reference(lm, c.prompt, c.max_new_tokens)
                                                                 for c in cases]


def test_rows_sharing_a_prefix_attend_through_the_kernel_exactly(kernel: DecodeKernel) -> None:
    """Twelve rows over one 200-token prefix, then four more: the batch holds it once (cascade attention), the
    rows' own windows through the kernel, merged by its log-sum-exps."""
    lm = tiny_llama_64(CpuAttention.KERNEL)
    rng = random.Random(5)
    prefix = tuple(rng.randrange(3, 512) for _ in range(200))
    cases = [Case(prefix + tuple(rng.randrange(3, 512) for _ in range(rng.randint(1, 30))), rng.randint(4, 16),
                  0 if i < 12 else rng.randint(1, 6)) for i in range(16)]
    assert engine_outputs(lm, "baton", cases, max_batch=16) == [reference(lm, c.prompt, c.max_new_tokens)
                                                                  for c in cases]


def test_flash_never_builds_the_kernel_and_kernel_says_why_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tiny_llama_64(CpuAttention.FLASH).decode_kernel is None
    with pytest.raises(KernelUnavailable, match="head_dim 64"):
        decode_kernel(CpuAttention.KERNEL, torch.float32, CPU, 16, 2)  # the tiny Llama's heads
    with pytest.raises(KernelUnavailable, match="float32 on a CPU"):
        decode_kernel(CpuAttention.KERNEL, torch.bfloat16, CPU, 64, 3)
    assert decode_kernel(CpuAttention.AUTO, torch.float32, CPU, 16, 2) is None  # auto: the flash kernel
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # an AVX2-only machine
    assert decode_kernel(CpuAttention.AUTO, torch.float32, CPU, 64, 3) is None
    with pytest.raises(KernelUnavailable, match="needs AVX-512"):
        decode_kernel(CpuAttention.KERNEL, torch.float32, CPU, 64, 3)
