#!/usr/bin/env bash
# The prepared GPU run, `baton bench gpu` (docs/benchmarks.md, "GPU: the prepared run"), for a machine whose python
# has CUDA PyTorch and transformers but maybe no internet and no virtualenv: runs Baton from this checkout with
# that python. Every result (JSON per part, summary.json, bench_gpu.log) goes to $OUT (default results/gpu).
#   scripts/bench_gpu.sh                       everything, 8 minutes at most
#   scripts/bench_gpu.sh --parts 2,3           some parts (any `baton bench gpu` flag is passed on)
#   BATON_DRY_RUN=1 scripts/bench_gpu.sh       the same run on the CPU, tiny (or --dry-run)
# Pure-Python packages the service part needs and the machine lacks can travel in .cache/gpu-deps (make gpu-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-${OUT_DIR:-results/gpu}}
DEPS=${BATON_GPU_DEPS:-$PWD/.cache/gpu-deps}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -d "$DEPS" ]; then export PYTHONPATH=$PYTHONPATH:$DEPS; fi
exec "$PY" -m baton.cli bench gpu --out-dir "$OUT" "$@"
