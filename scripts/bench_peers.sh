#!/usr/bin/env bash
# Baton side by side with vLLM for CPU, in one sitting, through one client: `baton bench serve --api openai`
# (streaming /v1/completions, token-id prompts, ignore_eos, usage from the stream) against `vllm serve` and
# against `baton serve`, on the same model directory (the embedded smollm2-135m, converted), float32, the same
# maximum batch (32); then `baton run` against vLLM's offline `LLM.generate` on the same requests. vLLM lives in
# its own virtual environment, .cache/peers/vllm, outside .venv: a benchmark peer, never a dependency of Baton.
#
# 1. `mixed` against `vllm serve` at each of VLLM_THREADS ("1 2") OpenMP threads; the better one is vLLM's.
# 2. `poisson` at 70% of that vLLM's measured capacity (its mixed requests/s), against vLLM and baton serve.
# 3. `mixed` against `baton serve` as it starts by default, with where the time went (--metrics), and with one
#    switch changed at a time: --local-prefill-tokens 0 (every prompt through the prefill worker and its KV over
#    gRPC), --cpu-gemm aten (PyTorch's own linear layers), --cpu-attention flash (PyTorch's flash kernel for
#    decode attention) and BATON_KV_RESERVE_BYTES=0 (no slab memory laid out at start), to show what each bought.
# 4. offline: the `mixed` requests (baton bench requests) through vLLM's LLM.generate and `baton run`.
# Results: results/peers/*.json and a summary table printed at the end (scripts/peers_table.py).
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_THREADS=${VLLM_THREADS:-1 2}
OUT=results/peers
PORT=18100
BATON=.venv/bin/baton
mkdir -p "$OUT"

# shellcheck source=scripts/vllm_setup.sh
source scripts/vllm_setup.sh  # VENV, VLLM_ENV, model

wait_ready() {  # url, pid, log
  for _ in $(seq 600); do
    curl -fsS -m 2 -o /dev/null "$1/v1/models" 2> /dev/null && return 0
    kill -0 "$2" 2> /dev/null || { tail -30 "$3"; return 1; }
    sleep 1
  done
  tail -30 "$3"; return 1
}

bench() {  # name, workload, url, extra arguments...
  "$BATON" bench serve --api openai --url "$3" --served-model smollm2-135m --workload "$2" --no-progress \
    --policy "$1" --out "$OUT/$2-$1.json" "${@:4}"
}

vllm_up() {  # threads
  env "${VLLM_ENV[@]}" OMP_NUM_THREADS="$1" "$VENV/bin/vllm" serve "$model" --served-model-name smollm2-135m \
    --dtype float32 --max-num-seqs 32 --max-model-len 2048 --port "$PORT" > "$OUT/vllm-t$1.log" 2>&1 &
  vllm=$!
  wait_ready "http://127.0.0.1:$PORT" "$vllm" "$OUT/vllm-t$1.log"
}

baton_up() {  # name, baton serve arguments...
  "$BATON" serve --http-port "$PORT" --grpc-port $((PORT + 1)) "${@:2}" > "$OUT/$1.log" 2>&1 &
  serve=$!
  for _ in $(seq 300); do grep -q "Services:" "$OUT/$1.log" && break; sleep 1; done  # every service ready
  grep -q "Services:" "$OUT/$1.log" || { tail -30 "$OUT/$1.log"; exit 1; }
  metrics=$(grep -o "http://[a-z0-9.:]*/metrics" "$OUT/$1.log" | sed 's/localhost/127.0.0.1/' | sort -u)
}

# ---- 1. mixed against vLLM at each thread setting -----------------------------------------------------------
for threads in $VLLM_THREADS; do
  vllm_up "$threads"
  bench "vllm-t$threads" mixed "http://127.0.0.1:$PORT"
  kill -INT "$vllm"; wait "$vllm" || true
done
best=$(.venv/bin/python - "$OUT" $VLLM_THREADS <<'PY'
import json, sys
out, threads = sys.argv[1], sys.argv[2:]
print(max(threads, key=lambda t: json.load(open(f"{out}/mixed-vllm-t{t}.json"))["output_tokens_per_s"]))
PY
)
rate=$(.venv/bin/python -c "import json; print(round(0.7 * json.load(open('$OUT/mixed-vllm-t$best.json'))['requests_per_s'], 4))")
echo "vLLM's better setting: $best threads; poisson at 70% of its capacity: $rate req/s"

# ---- 2. poisson at 70% of vLLM's capacity ------------------------------------------------------------------
vllm_up "$best"
bench "vllm-t$best" poisson "http://127.0.0.1:$PORT" --rate "$rate"
kill -INT "$vllm"; wait "$vllm" || true

# ---- 3. baton serve: default, then one switch at a time ----------------------------------------------------
baton_up baton
# shellcheck disable=SC2086
bench baton mixed "http://127.0.0.1:$PORT" --metrics $metrics
bench baton poisson "http://127.0.0.1:$PORT" --rate "$rate"
kill -TERM "$serve"; wait "$serve" || true
baton_up baton-disaggregated --local-prefill-tokens 0
# shellcheck disable=SC2086
bench baton-disaggregated mixed "http://127.0.0.1:$PORT" --metrics $metrics
kill -TERM "$serve"; wait "$serve" || true
baton_up baton-aten --cpu-gemm aten
bench baton-aten mixed "http://127.0.0.1:$PORT"
kill -TERM "$serve"; wait "$serve" || true
baton_up baton-flash --cpu-attention flash
bench baton-flash mixed "http://127.0.0.1:$PORT"
kill -TERM "$serve"; wait "$serve" || true
BATON_KV_RESERVE_BYTES=0 baton_up baton-no-reserve
bench baton-no-reserve mixed "http://127.0.0.1:$PORT"
kill -TERM "$serve"; wait "$serve" || true

# ---- 4. offline: vLLM's LLM.generate and baton run on the same requests -------------------------------------
"$BATON" bench requests --workload mixed --out "$OUT/mixed-requests.jsonl"
env "${VLLM_ENV[@]}" OMP_NUM_THREADS="$best" "$VENV/bin/python" scripts/vllm_offline.py "$model" \
  "$OUT/mixed-requests.jsonl" --out "$OUT/offline-vllm.json" > "$OUT/offline-vllm.log" 2>&1 \
  || { tail -30 "$OUT/offline-vllm.log"; exit 1; }
for variant in baton baton-fused; do
  flags=(); [ "$variant" = baton-fused ] && flags=(--fuse-prefill)
  start=$(date +%s.%N)
  "$BATON" run --input "$OUT/mixed-requests.jsonl" --output "$OUT/offline-$variant.jsonl" "${flags[@]}" \
    2> "$OUT/offline-$variant.log"
  end=$(date +%s.%N)
  .venv/bin/python - "$OUT" "$variant" "$start" "$end" <<'PY'
import json, re, sys
out, variant, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
log = open(f"{out}/offline-{variant}.log").read()
tokens, seconds = re.search(r"(\d+) tokens in ([\d.]+) s", log).groups()
json.dump({"system": f"baton run ({variant})", "output_tokens": int(tokens), "seconds": float(seconds),
           "output_tokens_per_s": int(tokens) / float(seconds), "process_seconds": end - start},
          open(f"{out}/offline-{variant}.json", "w"))
PY
done

.venv/bin/python scripts/peers_table.py "$OUT"
