#!/usr/bin/env bash
# The prefix caches on traffic that repeats itself (issue 13), in one sitting, through one client (`baton bench
# serve`): `chat` (conversations sharing a system prompt, each turn's prompt the whole conversation so far, sent
# when the last answer ended) and `shared-prefix` (one 1,024-token prefix before every prompt).
#
# 1. vllm:    vLLM for CPU (its prefix caching on, the default; set up as scripts/bench_peers.sh does) over its
#             OpenAI API, then `baton serve` as it starts by default over its own OpenAI API: same client, same
#             requests (the chat turns' answers come back as token ids: return_token_ids). Peak RSS of every
#             Baton process after both workloads (VmHWM).
# 2. pushed:  `baton serve --local-prefill-tokens 0` (every prompt through the prefill worker, its KV over gRPC:
#             the disaggregated path a multi-machine deployment takes) with the caches on, then off
#             (BATON_PREFIX_CACHE_BYTES=0): prompt tokens computed and KV bytes shipped per request.
# 3. default: `baton serve` as it starts by default, caches on, then off.
# 4. routers: one Redis, `baton serve --decode-workers 2` and a second router on the same registry: `chat` sent to
#             one router, then (a fresh stack) to both, each request to the next router; each decode worker's share.
# 5. memory:  a longer `chat` (96 conversations) with 64 MiB caches, resident memory and cache bytes every 10 s.
# Results: results/chat/*.json, a table at the end (scripts/chat_table.py).
#
#   scripts/bench_chat.sh                     # one to two hours on a 2-core CPU (106 min on an AVX2 EPYC)
#   PHASES="pushed routers" scripts/bench_chat.sh
#   CHAT_RATE=inf OUT=results/chat-inf scripts/bench_chat.sh   # every conversation at t=0: 32 users at once
set -euo pipefail
cd "$(dirname "$0")/.."
PHASES=${PHASES:-vllm pushed default routers memory}
VLLM_THREADS=${VLLM_THREADS:-2}
OUT=${OUT:-results/chat}
CHAT_RATE=${CHAT_RATE:-}  # conversations per second of `chat` (default: the workload's own, 0.5)
PORT=18200
REDIS_PORT=18299
BATON=.venv/bin/baton
mkdir -p "$OUT"
# shellcheck source=scripts/vllm_setup.sh
source scripts/vllm_setup.sh  # VENV, VLLM_ENV, model (installs vLLM for CPU the first time)

baton_up() {  # name, baton serve arguments... (environment assignments first, as env takes them)
  local name=$1; shift
  local envs=()
  while [ $# -gt 0 ] && [[ $1 == *=* ]]; do envs+=("$1"); shift; done
  env "${envs[@]}" "$BATON" serve --http-port "$PORT" --grpc-port $((PORT + 1)) "$@" > "$OUT/$name.log" 2>&1 &
  serve=$!
  for _ in $(seq 300); do grep -q "Services:" "$OUT/$name.log" && break; sleep 1; done  # every service ready
  grep -q "Services:" "$OUT/$name.log" || { tail -30 "$OUT/$name.log"; exit 1; }
  metrics=$(grep -o "http://[a-z0-9.:]*/metrics" "$OUT/$name.log" | sed 's/localhost/127.0.0.1/' | sort -u)
}

baton_down() {
  kill -TERM "$serve"; wait "$serve" || true
}

peak_rss() {  # name: VmHWM of every process of the running `baton serve`
  for pid in $(pgrep -f "baton.cli (decode|prefill|router) " || true); do
    role=$(tr '\0' ' ' < "/proc/$pid/cmdline" | grep -oE "baton.cli [a-z]+" | cut -d' ' -f2)
    echo "$role $(grep VmHWM "/proc/$pid/status" | awk '{print $2, $3}')"
  done > "$OUT/rss-$1.txt"
  cat "$OUT/rss-$1.txt"
}

bench() {  # label, workload, api, url, extra arguments...
  local rate=()
  [ "$2" = chat ] && [ -n "$CHAT_RATE" ] && rate=(--rate "$CHAT_RATE")
  "$BATON" bench serve --api "$3" --url "$4" --workload "$2" --no-progress --policy "$1" \
    --out "$OUT/$2-$1.json" "${rate[@]}" "${@:5}"
}

http="http://127.0.0.1:$PORT"
grpc="127.0.0.1:$((PORT + 1))"

for phase in $PHASES; do
  case $phase in
  vllm)
    env "${VLLM_ENV[@]}" OMP_NUM_THREADS="$VLLM_THREADS" "$VENV/bin/vllm" serve "$model" \
      --served-model-name smollm2-135m --dtype float32 --max-num-seqs 32 --max-model-len 2048 --port "$PORT" \
      > "$OUT/vllm.log" 2>&1 &
    vllm=$!
    for _ in $(seq 600); do
      curl -fsS -m 2 -o /dev/null "$http/v1/models" 2> /dev/null && break
      kill -0 "$vllm" 2> /dev/null || { tail -30 "$OUT/vllm.log"; exit 1; }
      sleep 1
    done
    for workload in chat shared-prefix; do
      bench vllm "$workload" openai "$http" --served-model smollm2-135m
    done
    kill -INT "$vllm"; wait "$vllm" || true
    baton_up baton
    for workload in chat shared-prefix; do
      # shellcheck disable=SC2086
      bench baton "$workload" openai "$http" --served-model smollm2-135m --metrics $metrics
    done
    peak_rss baton
    baton_down
    ;;
  pushed | default)
    flags=(); [ "$phase" = pushed ] && flags=(--local-prefill-tokens 0)
    for run in cache nocache; do
      envs=(); [ "$run" = nocache ] && envs=(BATON_PREFIX_CACHE_BYTES=0)
      baton_up "baton-$phase-$run" "${envs[@]}" "${flags[@]}"
      # shellcheck disable=SC2086
      bench "baton-$phase-$run" chat openai "$http" --served-model smollm2-135m --metrics $metrics
      peak_rss "baton-$phase-$run"
      baton_down
    done
    ;;
  routers)
    redis-server --port "$REDIS_PORT" --save "" --appendonly no > "$OUT/redis.log" 2>&1 &
    redis=$!
    for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping > /dev/null 2>&1 && break; sleep 0.1; done
    for routers in 1 2; do
      redis-cli -p "$REDIS_PORT" flushall > /dev/null
      token=$(.venv/bin/python -c "import secrets; print(secrets.token_hex(16))")
      baton_up "baton-routers$routers" --redis "redis://127.0.0.1:$REDIS_PORT/0" --internal-token "$token" \
        --decode-workers 2
      "$BATON" router --host 127.0.0.1 --grpc-port $((PORT + 3)) --http-port $((PORT + 2)) --model smollm2-135m \
        --redis "redis://127.0.0.1:$REDIS_PORT/0" --internal-token "$token" --local-prefill-tokens 2048 \
        > "$OUT/router2-$routers.log" 2>&1 &
      router2=$!
      for _ in $(seq 120); do curl -fsS -m 2 -o /dev/null "http://127.0.0.1:$((PORT + 2))/health" 2> /dev/null && break; sleep 1; done
      url=$grpc; [ "$routers" = 2 ] && url="$grpc,127.0.0.1:$((PORT + 3))"
      # shellcheck disable=SC2086
      bench "baton-routers$routers" chat grpc "$url" --metrics $metrics
      for m in $metrics; do echo "$m $(curl -s "$m" | grep '^baton_decode_requests_total{outcome="length"}' || true)"; done \
        > "$OUT/decode-share-routers$routers.txt"
      cat "$OUT/decode-share-routers$routers.txt"
      kill -TERM "$router2"; wait "$router2" || true
      baton_down
    done
    kill "$redis"; wait "$redis" || true
    ;;
  memory)
    # a longer chat run (96 conversations) with small caches (64 MiB each, so that they evict), sampling every
    # 10 s each service's resident memory and each cache's bytes: memory.txt
    baton_up baton-memory BATON_PREFIX_CACHE_BYTES=$((64 << 20))
    (
      while kill -0 "$serve" 2> /dev/null; do
        for pid in $(pgrep -f "baton.cli (decode|prefill) " || true); do
          role=$(tr '\0' ' ' < "/proc/$pid/cmdline" | grep -oE "baton.cli [a-z]+" | cut -d' ' -f2)
          echo "$(date +%s) $role $(grep -E 'VmRSS|VmHWM' "/proc/$pid/status" | awk '{printf "%s %s ", $1, $2}')"
        done
        for m in $metrics; do curl -s "$m" | grep -E '^baton_(decode|prefill)_(prefix_cache|kv_slab)_bytes ' || true; done
        sleep 10
      done
    ) > "$OUT/memory.txt" 2>&1 &
    # shellcheck disable=SC2086
    bench baton-memory chat grpc "$grpc" --requests 96 --metrics $metrics
    peak_rss baton-memory
    baton_down
    ;;
  *) echo "unknown phase $phase"; exit 2 ;;
  esac
done
.venv/bin/python scripts/chat_table.py "$OUT"
