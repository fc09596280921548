#!/usr/bin/env bash
# Runs every benchmark behind docs/benchmarks.md, one after another, on a quiet machine.
# Usage: scripts/bench-all.sh [--quick]   (--quick: smaller sizes, for a smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."
quick=${1:-}
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(date -u +%Y-%m-%dT%H:%MZ)"
cargo build --release --workspace
if [ "$quick" = "--quick" ]; then
  export BENCH_USERS=100000 BENCH_TIPS=1000000 BENCH_MEM_ACCOUNTS=1000000 BENCH_REPLAY_TIPS=500000 BENCH_SNAPSHOT_ACCOUNTS=1000000
fi
cargo bench --bench state_machine 2>&1 | grep -E "^state_machine|thrpt|^apply_tip"
cargo bench --bench wal_append 2>&1 | grep -E "^wal_append|time:|thrpt"
cargo bench --bench engine 2>&1 | grep -vE "^\s*(Compiling|Finished|Running)"
cargo bench --bench recovery 2>&1 | grep -E "^(replay|snapshot)"
cargo bench --bench loopback 2>&1 | grep -E "^loopback"
cargo bench --bench disk_sync 2>&1 | grep -E "^write"
for batch in 1 64 512; do
  conns=4; window=8
  [ "$batch" = 1 ] && { conns=50; window=1; }
  echo "tcp storm, sync durability, batch $batch, $conns connections x window $window:"
  for write in mmap pwrite; do
    echo "  --log-write $write:"
    STORMLEDGER_LOG_WRITE=$write target/release/stormledger-storm --spawn --durability sync --duration 10 --users 100000 \
      --streamers 1000 --hot-percent 50 --batch "$batch" --connections "$conns" --window "$window" --read-percent 5 \
      --json 2>/dev/null | tail -1
  done
done
