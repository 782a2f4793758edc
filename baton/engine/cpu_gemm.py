"""Linear layers on a CPU through oneDNN with weights packed once, at load time.

PyTorch's `F.linear` on a CPU calls MKL's GEMM, which re-lays out the weight matrix on every call; oneDNN can
take the weight already in its own blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what
`torch.compile` does with frozen weights on a CPU), which is markedly faster for the shapes an LLM runs: a few
rows against a wide matrix in a decode step, a few thousand in a prefill. `pack_linears` swaps every float32
`nn.Linear` of a model on the CPU for a `PackedLinear` doing just that; everywhere else (CUDA, half precision,
a PyTorch without oneDNN) the model is left as it is.

The weights must not change after packing (inference only). Results are the same function computed with a
different summation order: they differ from MKL's in the last bits (about 1e-6 relative), as any two GEMM
libraries do. Greedy outputs still equal `generate()` on the same loaded model, which runs the same kernels
(the engine's tests).
"""

from __future__ import annotations

import enum

import torch
from torch import nn

PACK_BATCH_HINT = 32  # rows oneDNN lays the packed weight out for (any row count works)


class CpuGemm(enum.Enum):
    ONEDNN = "onednn"  # linear layers with prepacked weights (the default on a CPU)
    ATEN = "aten"  # PyTorch's own F.linear (MKL)


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed for oneDNN. The original weight and bias stay the module's parameters, so
    the model's state dict, saving, weight tying and fingerprint are those of the unpacked model; the packed
    copy costs a second copy of the linear weights in memory."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_BATCH_HINT)
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # [..., in] -> [tokens, in]
        if not flat.is_contiguous():
            flat = flat.contiguous()
        bias = None if self.bias is None else self.bias.detach()
        y = torch.ops.mkldnn._linear_pointwise(flat, self.packed, bias, "none", [], "")  # [tokens, out]
        return y.reshape(*x.shape[:-1], self.out_features)  # [..., out]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn packed"


def usable(model: nn.Module) -> bool:
    """Whether this model's linear layers can run packed: float32 on the CPU, with oneDNN in this PyTorch."""
    p = next(model.parameters())
    return p.device.type == "cpu" and p.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear of `model` by a PackedLinear, in place (for inference only); how many."""
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(linear))
    return len(targets)
