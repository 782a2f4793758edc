#!/usr/bin/env bash
# The CPU compose stack (docker-compose.yml + docker-compose.cpu.yml: Redis, router, one prefill and one decode
# worker in containers) under `baton bench serve`, two ways in one sitting: the workers taking turns on every core
# (the override's default, BATON_SHARED_CORES) and the cores split between them (BATON_SHARED_CORES= and
# BATON_THREADS = half the cores each). Then `baton serve` on the same machine, for the cost of the containers.
# Results: results/compose/<workload>-{shared,split,serve}.json, and each run's summary line on stdout.
# Needs the image (make image; IMAGE=baton:cpu) and a Docker engine with Compose v2 (scripts/docker_engine.sh).
# Settings: WORKLOAD (mixed), IMAGE, REDIS_IMAGE (redis:7.4-alpine), extra arguments go to `baton bench serve`.
set -euo pipefail
cd "$(dirname "$0")/.."

WORKLOAD=${WORKLOAD:-mixed}
IMAGE=${IMAGE:-baton:cpu}
REDIS_IMAGE=${REDIS_IMAGE:-redis:7.4-alpine}
OUT=results/compose
BATON=.venv/bin/baton
mkdir -p "$OUT"
http=18000; grpc=15051
compose=(docker compose -p baton-bench -f docker-compose.yml -f docker-compose.cpu.yml)
export BATON_IMAGE=$IMAGE BATON_REDIS_IMAGE=$REDIS_IMAGE BATON_HTTP_PUBLISH=$http BATON_GRPC_PUBLISH=$grpc
trap '"${compose[@]}" down --volumes --timeout 120 > /dev/null 2>&1 || true' EXIT

run_compose() {  # name, then environment assignments for compose
  local name=$1; shift
  env "$@" "${compose[@]}" up -d --no-build --force-recreate --wait --wait-timeout 600 > /dev/null
  "$BATON" bench serve --url "127.0.0.1:$grpc" --workload "$WORKLOAD" --no-progress \
    --policy baton --out "$OUT/$WORKLOAD-$name.json" "${BENCH_ARGS[@]}"
  "${compose[@]}" down --timeout 120 > /dev/null  # the models volume stays: no conversion in the next run
}

BENCH_ARGS=("$@")
half=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
run_compose shared
run_compose split BATON_SHARED_CORES= BATON_THREADS="$half"

# baton serve: the same topology as processes (it shares the cores the same way on a CPU-only machine)
"$BATON" serve --http-port "$http" --grpc-port "$grpc" > "$OUT/serve.log" 2>&1 &
serve=$!
for _ in $(seq 300); do grep -q "Services:" "$OUT/serve.log" && break; sleep 1; done
grep -q "Services:" "$OUT/serve.log" || { tail -20 "$OUT/serve.log"; exit 1; }
"$BATON" bench serve --url "127.0.0.1:$grpc" --workload "$WORKLOAD" --no-progress \
  --policy baton --out "$OUT/$WORKLOAD-serve.json" "${BENCH_ARGS[@]}"
kill -TERM "$serve"; wait "$serve" || true

