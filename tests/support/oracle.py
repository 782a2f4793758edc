"""What Baton's outputs must equal, and waiting for a condition: shared by every test that checks tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from baton.engine.models import LoadedModel


def reference(lm: LoadedModel, prompt: Sequence[int], max_new: int, ignore_eos: bool = True) -> list[int]:
    """Greedy tokens from transformers' own generate() on the prompt alone: exactly max_new of them with
    `ignore_eos`, else up to and including the end-of-sequence token."""
    generate: Any = lm.model.generate  # typed as a Tensor attribute by torch's Module stubs
    extra = {"min_new_tokens": max_new} if ignore_eos else {}
    out = generate(torch.tensor([list(prompt)]), max_new_tokens=max_new, do_sample=False, pad_token_id=0, **extra)
    return [int(t) for t in out[0, len(prompt):].tolist()]


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `cond` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:g}s"
        time.sleep(0.02)


async def until(cond: Callable[[], bool], timeout: float = 20.0) -> None:
    """wait_for on an event loop."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"condition not reached within {timeout:g}s"
        await asyncio.sleep(0.01)
