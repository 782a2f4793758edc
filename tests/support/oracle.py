"""What Baton's outputs must equal, and waiting for a condition: shared by every test that checks tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import torch

from baton.bench.exactness import reference  # the one generate() reference
from baton.engine.models import LoadedModel

__all__ = ["reference", "reference_logprobs", "until", "wait_for"]

LOGPROB_TOLERANCE = 1e-4  # float32: Baton's batched logprobs against transformers' on the sequence alone


@torch.inference_mode()
def reference_logprobs(lm: LoadedModel, ids: Sequence[int]) -> torch.Tensor:
    """transformers' own log-probabilities over the sequence alone, one forward pass: [len(ids), vocab], row i
    the distribution of the token after ids[: i + 1]."""
    out = lm.model(input_ids=torch.tensor([list(ids)], device=lm.device))
    return torch.log_softmax(out.logits[0].float(), dim=-1).cpu()


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
