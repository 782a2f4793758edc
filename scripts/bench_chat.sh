#!/usr/bin/env bash
# The prefix caches on traffic that repeats itself (issue 13): `chat` (conversations sharing a system prompt, each
# turn's prompt the whole conversation so far) and `shared-prefix` (one 1,024-token prefix before every prompt),
# through `baton serve` as it starts by default, then with both workers' caches off (BATON_PREFIX_CACHE_BYTES=0),
# one after the other, with where the time and the prompt tokens went (--metrics). Results in results/chat/.
#
#   scripts/bench_chat.sh            # about 15 minutes on a 2-core CPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=results/chat
PORT=18200
BATON=.venv/bin/baton
mkdir -p "$OUT"

baton_up() {  # name, environment assignments...
  env "${@:2}" "$BATON" serve --http-port "$PORT" --grpc-port $((PORT + 1)) > "$OUT/$1.log" 2>&1 &
  serve=$!
  for _ in $(seq 300); do grep -q "Services:" "$OUT/$1.log" && break; sleep 1; done  # every service ready
  grep -q "Services:" "$OUT/$1.log" || { tail -30 "$OUT/$1.log"; exit 1; }
  metrics=$(grep -o "http://[a-z0-9.:]*/metrics" "$OUT/$1.log" | sed 's/localhost/127.0.0.1/' | sort -u)
}

for run in cache nocache; do
  if [ "$run" = cache ]; then baton_up "baton-$run"; else baton_up "baton-$run" BATON_PREFIX_CACHE_BYTES=0; fi
  for workload in chat shared-prefix; do
    # shellcheck disable=SC2086
    "$BATON" bench serve --url "127.0.0.1:$((PORT + 1))" --workload "$workload" --no-progress \
      --policy "baton-$run" --out "$OUT/$workload-baton-$run.json" --metrics $metrics
  done
  kill -TERM "$serve"; wait "$serve" || true
done
.venv/bin/python scripts/chat_table.py "$OUT"
