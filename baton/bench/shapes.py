"""Named model shapes: real architectures' configurations with random weights, built straight on the device.

With `ignore_eos` and random-token prompts a model's speed does not depend on its weights' values, so a
benchmark needs only the shape: `build("llama-3-8b", "cuda", "bfloat16")` makes a Llama-3-8B-shaped model
without a file. `scaled_down=True` keeps everything about a shape (GQA, RoPE scaling, tied embeddings, its
context) but shrinks its widths, depth and vocabulary to a tiny model, so that a CPU dry run exercises the very
configuration a GPU run will. `tiny-llama` and `tiny-gpt2` are the test suite's tiny models (tests/conftest.py).

A service loads a model from a directory with a tokenizer: `save_model_dir` writes the model and a word-level
tokenizer covering its whole vocabulary (token i is the word `<i>`), made in code, so no tokenizer file has to
travel with the checkout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from baton.engine.models import LoadedModel, parse_dtype

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# What scaled_down replaces: a shape's widths, depth and vocabulary (the rest of its config is kept).
_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 2048, "bos_token_id": 1, "eos_token_id": 2}


@dataclass(frozen=True)
class Shape:
    name: str
    model_type: str  # "llama" or "gpt2"
    config: dict[str, Any] = field(default_factory=dict)
    tiny: bool = False  # already a test-sized model: scaling it down changes nothing

    def config_kwargs(self, scaled_down: bool = False) -> dict[str, Any]:
        kw = dict(self.config)
        if scaled_down and not self.tiny:
            kw.update(_TINY)
        return kw


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("llama-3.2-1b", "llama", {
            "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE, "tie_word_embeddings": True,
            "bos_token_id": 128000, "eos_token_id": 128001,
        }),
        Shape("llama-3-8b", "llama", {
            "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
            "bos_token_id": 128000, "eos_token_id": 128001,
        }),
        Shape("tiny-llama", "llama", {
            "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
            "eos_token_id": 2, "pad_token_id": 2, "bos_token_id": 1,
        }, tiny=True),
        Shape("tiny-gpt2", "gpt2", {
            "vocab_size": 49152, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 1024,
            "eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 2,
        }, tiny=True),
    )
}


def get_shape(name: str) -> Shape:
    if name not in SHAPES:
        raise ValueError(f"shape: unknown {name!r}, choose one of {', '.join(SHAPES)}")
    return SHAPES[name]


def label(name: str, scaled_down: bool) -> str:
    """How results name a model built from a shape: the shape, and `(scaled down)` for a dry run's."""
    return f"{name} (scaled down)" if scaled_down and not get_shape(name).tiny else name


def build(name: str, device: str | torch.device, dtype: str | torch.dtype | None = None, *,
          scaled_down: bool = False, seed: int = 0) -> LoadedModel:
    """A model of the named shape with random weights (seeded), created on `device` in `dtype`; no tokenizer."""
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, dev)
    torch.manual_seed(seed)
    with dev:
        model = AutoModelForCausalLM.from_config(config(name, scaled_down), dtype=dt)
    return LoadedModel(model.to(dev, dt), None, label(name, scaled_down))


def config(name: str, scaled_down: bool = False) -> Any:
    """The transformers configuration of the named shape."""
    from transformers import AutoConfig

    shape = get_shape(name)
    return AutoConfig.for_model(shape.model_type, **shape.config_kwargs(scaled_down))


def word_tokenizer(vocab_size: int, bos_token_id: int | None = None, eos_token_id: int | None = None) -> Any:
    """A fast tokenizer whose vocabulary is exactly ids 0..vocab_size-1, token i being the word `<i>` (text is
    split on whitespace; an unknown word is `<0>`). The brackets keep one token from being a prefix of another,
    which matters for the special ones, found anywhere in a text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special: dict[str, str] = {"unk_token": "<0>"}
    if bos_token_id is not None and 0 <= bos_token_id < vocab_size:
        special["bos_token"] = f"<{bos_token_id}>"
    if eos_token_id is not None and 0 <= eos_token_id < vocab_size:
        special["eos_token"] = f"<{eos_token_id}>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def tokenizer_for(lm: LoadedModel) -> Any:
    cfg = lm.config
    eos = cfg.eos_token_id[0] if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id
    return word_tokenizer(int(cfg.vocab_size), cfg.bos_token_id, eos)


def save_model_dir(lm: LoadedModel, path: Path) -> Path:
    """Write `lm` as a Hugging Face model directory a service can load (`--model path`), with a word-level
    tokenizer of its vocabulary (`lm.tokenizer`, made when the model has none)."""
    path.mkdir(parents=True, exist_ok=True)
    if lm.tokenizer is None:
        lm.tokenizer = tokenizer_for(lm)
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path
