"""Shared fixtures: tiny random models (fast) and the real embedded smollm2-135m (slow, loaded once)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from baton.bench import shapes
from baton.engine.models import LoadedModel, load_model, smollm2_dir
from baton.engine.request import Request, SamplingParams
from baton.engine.spec import ModelSpec

VOCAB = 49152  # smollm2's tokenizer, so tiny models can take text too
# The tiny Llama's description, for routers in front of tiny or fake workers (test_engine checks it is).
TINY_SPEC = ModelSpec(max_context=1024, vocab_size=VOCAB, num_layers=2, kv_heads=2, head_dim=16)

# Worker processes started by tests find their internal token in this file (created on first use), inherited
# through the environment; tests' own calls to workers read it too (tests/support/processes.py: worker_channel).
# So no test reads or writes the user's own token file in ~/.cache/baton.
os.environ.setdefault("BATON_INTERNAL_TOKEN_FILE",
                      str(Path(tempfile.mkdtemp(prefix="baton-test-token-")) / "internal-token"))

# Service tests run worker processes beside this one on a 2-core machine: oversubscribed OpenMP threads spin and
# slow everything down tenfold, so the test process keeps to one thread (tests assert behaviour, not speed).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(smollm2_dir())


def make_tiny_llama(tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0) -> LoadedModel:
    """A random Llama with GQA (4 query heads, 2 kv heads) and RoPE: the shape `tiny-llama` of
    baton/bench/shapes.py, which the GPU run's exactness part builds too."""
    return LoadedModel(shapes.build("tiny-llama", "cpu", "float32", seed=seed).model, tokenizer, "tiny-llama")


def make_tiny_gpt2(tokenizer: PreTrainedTokenizerBase | None = None, seed: int = 0) -> LoadedModel:
    """A random GPT-2 (absolute position embeddings, no GQA): the shape `tiny-gpt2` of baton/bench/shapes.py."""
    return LoadedModel(shapes.build("tiny-gpt2", "cpu", "float32", seed=seed).model, tokenizer, "tiny-gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tokenizer: PreTrainedTokenizerBase) -> LoadedModel:
    return make_tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2(tokenizer: PreTrainedTokenizerBase) -> LoadedModel:
    return make_tiny_gpt2(tokenizer)


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2-135m", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_llama_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: LoadedModel, tokenizer: PreTrainedTokenizerBase
) -> Path:
    """The tiny Llama saved as a Hugging Face model directory (for commands that take --model)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama.model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def make_request():
    """Build a Request: make_request("id", [1, 2, 3], max_new_tokens=4, ...)."""

    def make(rid: str, prompt_ids: list[int], **params: object) -> Request:
        return Request(rid, list(prompt_ids), SamplingParams(**params))  # type: ignore[arg-type]

    return make
