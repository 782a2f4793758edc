"""A decode step's attention on a CPU: PyTorch's flash kernel, or Baton's own kernel for AVX-512.

Why a kernel of our own. A decode step of a CPU batch reads every row's keys and values once per layer; PyTorch's
CPU flash kernel does it at 11-18 GB/s on machine L (docs/benchmarks.md), 2.2-3.5x the time of a plain read of
the same tensors, and it reads a segment's padding columns as well (40% of them in `mixed`). Attention is 25-35%
of a step there. `csrc/decode_attention.cpp` reads only the columns a row attends, scores 16 keys per vector and
keeps a KV head's query heads in registers: 1.26-1.40x faster than the flash kernel on the shapes of a decode
step (`scripts/decode_attention/bench.py`). Its outputs differ from the flash kernel's in the last bits (a
different summation order, within 3e-7), as any two attention kernels do; greedy outputs still equal
`generate()` (the engine's tests run through it).

When it is used (`--cpu-attention`, LoadedModel): `auto` builds it at load where it can run (an x86 CPU with
AVX-512 F/BW/VL/DQ, float32 on the CPU, head_dim 64, at most 8 query heads per KV head) and a C++ compiler and
ninja are at hand, and uses it for every decode step it applies to; anywhere else, or if the build fails (the
reason is logged), the flash kernel as before. `kernel` insists (a clear error where it cannot run); `flash`
never builds it. The build takes ~30 s the first time and is cached under the Baton cache directory.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from baton.flags import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "decode_attention.cpp"
# ISA flags named, not -march=native: a build cached on one machine must run on any AVX-512 machine after it
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-fopenmp",
          "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
HEAD_DIM = 64
MAX_QUERY_HEADS_PER_KV_HEAD = 8

# q [n, kv_heads, rep, d], k/v [n, kv_heads, W, d], valid [n, W] bool, scale -> out [n, kv_heads, rep, d], lse
DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                        tuple[torch.Tensor, torch.Tensor]]


class CpuAttention(enum.Enum):
    AUTO = "auto"  # the kernel where it can run and builds, else the flash kernel
    KERNEL = "kernel"  # the kernel, or an error saying why not
    FLASH = "flash"  # PyTorch's flash kernel


class KernelUnavailable(ValueError):
    """The kernel cannot run here; the message says why."""


def _why_not(dtype: torch.dtype, device: torch.device, head_dim: int, rep: int) -> str | None:
    """Why the kernel cannot serve this model here, or None when it can."""
    if device.type != "cpu" or dtype != torch.float32:
        return f"it runs float32 on a CPU only (this model: {dtype} on {device.type})"
    if head_dim != HEAD_DIM or not 1 <= rep <= MAX_QUERY_HEADS_PER_KV_HEAD:
        return (f"it needs head_dim {HEAD_DIM} and at most {MAX_QUERY_HEADS_PER_KV_HEAD} query heads per KV head "
                f"(this model: {head_dim}, {rep})")
    capability = torch.backends.cpu.get_cpu_capability()  # ATen's reading of the CPU (ATEN_CPU_CAPABILITY lowers it)
    if capability != "AVX512":
        return f"it needs AVX-512 (F, BW, VL, DQ), and ATen finds {capability} here"
    if shutil.which("c++") is None and shutil.which("g++") is None:
        return "no C++ compiler (c++ or g++) to build it"
    return None


def _build() -> DecodeKernel:
    from torch.utils.cpp_extension import load, verify_ninja_availability

    try:  # the ninja wheel (a dependency) puts its binary next to the interpreter's, which PATH may not name
        import ninja

        if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    try:
        verify_ninja_availability()
    except RuntimeError as e:
        raise KernelUnavailable("ninja is needed to build it (pip install ninja)") from e
    build_dir = cache_dir() / "extensions" / f"torch-{torch.__version__}"
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        ext = load("baton_decode_attention", [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                   build_directory=str(build_dir))
    except Exception as e:  # a compiler error, a missing header: the flash kernel serves instead
        raise KernelUnavailable(f"its build failed: {e}") from e
    return ext.decode_attention


_built: DecodeKernel | None = None


def decode_kernel(choice: CpuAttention, dtype: torch.dtype, device: torch.device, head_dim: int,
                  rep: int) -> DecodeKernel | None:
    """The kernel a model with these facts gets for its decode steps under `choice`: None for the flash kernel.
    Raises KernelUnavailable when `choice` is KERNEL and it cannot be had."""
    global _built
    if choice is CpuAttention.FLASH:
        return None
    why = _why_not(dtype, device, head_dim, rep)
    if why is None and _built is None:
        try:
            _built = _build()
        except KernelUnavailable as e:
            why = str(e)
    if why is None:
        return _built
    if choice is CpuAttention.KERNEL:
        raise KernelUnavailable(f"--cpu-attention kernel: {why}")
    if device.type == "cpu" and dtype == torch.float32:
        log.info("decode attention through PyTorch's flash kernel: Baton's CPU kernel is not used, %s", why)
    return None
