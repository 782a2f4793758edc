#!/usr/bin/env bash
# vLLM for CPU and `baton serve`, both up at once (the idle one waits on its sockets), loaded in turn with the
# same workload REPEATS times: vLLM, Baton, vLLM, Baton, ... so that the drift of a shared machine hits both
# alike. Pair i draws its requests with seed i - 1 (pair 1 is the workload's default, seed 0): both servers keep
# a prefix cache, and the same prompts again would be answered from it (vLLM ran `mixed` 1.4x faster the second
# time on machine L). Prints each run, the median output tok/s of each and the median of the pairwise ratios.
# Needs the vLLM environment scripts/bench_peers.sh sets up. Settings: THREADS (vLLM's OpenMP threads, 1), REPEATS (3),
# WORKLOAD (mixed); extra arguments go to `baton serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

THREADS=${THREADS:-1}
REPEATS=${REPEATS:-3}
WORKLOAD=${WORKLOAD:-mixed}
VENV=.cache/peers/vllm
OUT=results/peers/interleaved
BATON=.venv/bin/baton
VPORT=18300
BPORT=18310
mkdir -p "$OUT"
[ -x "$VENV/bin/vllm" ] || { echo "run scripts/bench_peers.sh first: it installs vLLM in $VENV" >&2; exit 1; }
model=$(.venv/bin/python -c "from baton.engine.models import smollm2_dir; print(smollm2_dir())")

VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=auto OMP_NUM_THREADS=$THREADS \
  "$VENV/bin/vllm" serve "$model" --served-model-name smollm2-135m --dtype float32 --max-num-seqs 32 \
  --max-model-len 2048 --port "$VPORT" > "$OUT/vllm.log" 2>&1 &
vllm=$!
"$BATON" serve --http-port "$BPORT" --grpc-port $((BPORT + 1)) "$@" > "$OUT/baton.log" 2>&1 &
serve=$!
trap 'kill -INT $vllm 2> /dev/null; kill -TERM $serve 2> /dev/null; wait' EXIT
for _ in $(seq 600); do
  curl -fsS -m 2 -o /dev/null "http://127.0.0.1:$VPORT/v1/models" 2> /dev/null && grep -q "Services:" "$OUT/baton.log" \
    && break
  sleep 1
done

for i in $(seq "$REPEATS"); do
  for sys in vllm baton; do
    port=$VPORT; [ "$sys" = baton ] && port=$BPORT
    "$BATON" bench serve --api openai --url "http://127.0.0.1:$port" --served-model smollm2-135m \
      --workload "$WORKLOAD" --seed $((i - 1)) --no-progress --policy "$sys" \
      --out "$OUT/$WORKLOAD-$sys-$i.json" | grep "@"
  done
done

.venv/bin/python - "$OUT" "$WORKLOAD" "$REPEATS" <<'PY'
import json, statistics, sys
out, workload, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tps = {s: [json.load(open(f"{out}/{workload}-{s}-{i}.json"))["output_tokens_per_s"] for i in range(1, n + 1)]
       for s in ("vllm", "baton")}
ttft = {s: [json.load(open(f"{out}/{workload}-{s}-{i}.json"))["ttft_s"]["p50"] for i in range(1, n + 1)]
        for s in ("vllm", "baton")}
ratios = [b / v for b, v in zip(tps["baton"], tps["vllm"])]
for s in ("vllm", "baton"):
    print(f"{s}: output tok/s {', '.join(f'{x:.1f}' for x in tps[s])} (median {statistics.median(tps[s]):.1f}); "
          f"TTFT p50 {', '.join(f'{x:.2f}' for x in ttft[s])} s (median {statistics.median(ttft[s]):.2f})")
print(f"baton / vllm, pair by pair: {', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f})")
PY
