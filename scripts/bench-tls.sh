#!/usr/bin/env bash
# The cost of TLS over TCP: the same storms against `stormledger serve` without and with TLS
# (test certificate of tests/fixtures/tls, ECDSA P-256), in-memory durability so that the disk
# does not blur the network path, then 200 one-shot CLI reads (connect + handshake + one read).
# Usage: scripts/bench-tls.sh [SECONDS]   (storm length, default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
cargo build --release --workspace
fixtures=tests/fixtures/tls
token=bench-tls-token
work=$(mktemp -d)
server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
trap 'stop_server; rm -rf "$work"' EXIT

start_server() { # $1: plain|tls
  local extra=()
  [ "$1" = tls ] && extra=(--tls-cert "$fixtures/server.pem" --tls-key "$fixtures/server.key")
  rm -rf "$work/data" && mkdir -p "$work/data"
  target/release/stormledger serve --listen 127.0.0.1:0 --durability memory --shards 2 \
    --data-dir "$work/data" --token "$token" "${extra[@]}" >"$work/out" 2>"$work/err" &
  server_pid=$!
  for _ in $(seq 100); do grep -q "listening on" "$work/out" 2>/dev/null && break; sleep 0.1; done
  addr=$(sed -n 's/^listening on //p' "$work/out")
}

for mode in plain tls plain tls; do
  tls=()
  [ "$mode" = tls ] && tls=(--tls-ca "$fixtures/ca.pem")
  for batch in 1 512; do
    conns=4; window=8
    [ "$batch" = 1 ] && { conns=50; window=1; }
    start_server "$mode"
    echo -n "$mode batch $batch, $conns connections x window $window: "
    target/release/stormledger-storm --connect "$addr" --token "$token" "${tls[@]}" --duration "$secs" \
      --users 100000 --streamers 1000 --hot-percent 50 --batch "$batch" --connections "$conns" \
      --window "$window" --read-percent 5 --json 2>/dev/null | tail -1 | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("tips/s %d write p50 %d us p99 %d us read p50 %d us p99 %d us verified %s" % (r["tips_per_sec"],
      r["write_p50_us"], r["write_p99_us"], r["read_p50_us"], r["read_p99_us"], r["verified"]))'
    stop_server
  done
done

for mode in plain tls; do
  tls=()
  [ "$mode" = tls ] && tls=(--tls-ca "$fixtures/ca.pem")
  start_server "$mode"
  start=$(date +%s.%N)
  for _ in $(seq 200); do
    target/release/stormledger --connect "$addr" --token "$token" "${tls[@]}" balance 1 >/dev/null || true
  done
  end=$(date +%s.%N)
  echo "$mode: 200 CLI reads (process + connect + handshake + read) in $(python3 -c "print(round($end - $start, 2))") s"
  stop_server
done
