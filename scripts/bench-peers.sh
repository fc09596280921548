#!/usr/bin/env bash
# Gift storm: stormledger vs Redis (AOF appendfsync always / everysec) vs PostgreSQL
# (synchronous_commit on), same shape, same machine, one run.
#
# Shape: USERS users funded with 6480 coins, 1000 streamers, HOT% of tips to streamer 0, tips of
# 1..20 coins, tips only (no gifts, no reads, nobody poor), every tip idempotent on its id.
#   stormledger: stormledger-storm --spawn (or --engine while `stormledger serve` does not exist),
#                closed loop, per-request (--batch 1, 50 connections, window 1) and batched
#                (--batch 64 and --batch 512, 4 connections, window 8); its own end-to-end check.
#   Redis 7:     FUNCTION tip_bench via redis-benchmark -c 50, -P 1 and -P 32; money conservation.
#   PostgreSQL:  tip() plpgsql via pgbench -M prepared -c 16 -j 2; money conservation.
# Servers listen on 127.0.0.1 only; data under /tmp/stormledger-peers; everything is stopped at
# the end. Installs redis-server, redis-tools and postgresql with apt-get when missing (root).
#
# Usage: scripts/bench-peers.sh [--users N] [--secs S] [--only "stormledger redis pg"] [--no-install]
# Env:   STORM_BIN (default target/release/stormledger-storm), REDIS_PORT=6390, PG_PORT=5499
# Output: a table on stdout (also /tmp/stormledger-peers/results.md) with ratios to stormledger.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PEERS=$ROOT/scripts/peers
. "$PEERS/common.sh"

USERS=100000
SECS=10
ONLY="stormledger redis pg"
INSTALL=1
while [ $# -gt 0 ]; do
  case $1 in
    --users) USERS=$2; shift 2 ;;
    --secs) SECS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
STREAMERS=1000
HOT=50
TIPMAX=20
COINS=6480
REDIS_PORT=${REDIS_PORT:-6390}
PG_PORT=${PG_PORT:-5499}
HOST=127.0.0.1
BASE=/tmp/stormledger-peers
RESULTS=$BASE/results.md
mkdir -p "$BASE"
ROWS=()   # "system|config|tips/s|p50|p99|p99.9|check"

want() { [[ " $ONLY " == *" $1 "* ]]; }

# ---- install -------------------------------------------------------------------------------------
need_pkgs=()
want redis && { command -v redis-server >/dev/null && command -v redis-benchmark >/dev/null || need_pkgs+=(redis-server redis-tools); }
want pg && { ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || need_pkgs+=(postgresql); }
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$INSTALL" = 1 ] && [ "$(id -u)" = 0 ]; then
    log "apt-get install ${need_pkgs[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  else
    echo "missing packages: ${need_pkgs[*]} (run as root, or apt-get install them)" >&2; exit 1
  fi
fi

REDIS_PID=""
PG_DATA=""
PGBIN=""
cleanup() {
  if [ -n "$REDIS_PID" ]; then kill "$REDIS_PID" 2>/dev/null || true; wait "$REDIS_PID" 2>/dev/null || true; fi
  if [ -n "$PG_DATA" ] && [ -f "$PG_DATA/postmaster.pid" ]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$BASE/redis" "$BASE/pg"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "machine: $(nproc) cores, $(free -h | awk '/^Mem:/{print $2}') RAM; 8 KiB O_DSYNC write under /tmp: $(fsync_probe /tmp) us"

# ---- stormledger -----------------------------------------------------------------------------------
storm_row() {  # $1 label, rest = extra storm args
  local label=$1 out tps p50 p99 p999 ok; shift
  out=$("$STORM" "$STORM_MODE" --durability sync --users "$USERS" --streamers "$STREAMERS" --hot-percent "$HOT" \
        --tip-max "$TIPMAX" --topup-yuan $(( COINS / 10 )) --read-percent 0 --gift-percent 0 --poor-percent 0 \
        --duration "$SECS" --json "$@" | tail -1) || true
  tps=$(jfield tips_per_sec "$out"); p50=$(jfield write_p50_us "$out"); p99=$(jfield write_p99_us "$out")
  p999=$(jfield write_p999_us "$out"); ok=$(jfield verified "$out")
  log "stormledger $label: ${tps:-NA} tips/s p50 ${p50:-NA} p99 ${p99:-NA} p99.9 ${p999:-NA} us, verified ${ok:-NA}"
  ROWS+=("stormledger ($STORM_MODE_NAME)|$label|${tps%.*}|$p50|$p99|$p999|verified=${ok:-NA}")
}
if want stormledger; then
  STORM=${STORM_BIN:-$ROOT/target/release/stormledger-storm}
  if [ ! -x "$STORM" ] || [ ! -x "$ROOT/target/release/stormledger" ]; then
    log "building release binaries"
    (cd "$ROOT" && cargo build --release -p stormledger-tools -p stormledger)
  fi
  if "$ROOT/target/release/stormledger" --help 2>&1 | grep -qE '^\s*serve'; then
    STORM_MODE=--spawn; STORM_MODE_NAME="spawn, TCP"
  else
    STORM_MODE=--engine; STORM_MODE_NAME="engine in-process: no serve yet"
    log "stormledger serve not available: measuring --engine (in-process, no TCP)"
  fi
  storm_row "batch 1, 50 conns x window 1" --connections 50 --window 1 --batch 1
  storm_row "batch 64, 4 conns x window 8" --connections 4 --window 8 --batch 64
  storm_row "batch 512, 4 conns x window 8" --connections 4 --window 8 --batch 512
fi

# ---- Redis -----------------------------------------------------------------------------------------
R() { redis-cli -h "$HOST" -p "$REDIS_PORT" "$@"; }
redis_bench() {  # $1 pipeline $2 requests -> "rps p50_us p99_us p999_us"
  timeout $(( SECS * 6 + 60 )) redis-benchmark -h "$HOST" -p "$REDIS_PORT" -c 50 -P "$1" -n "$2" -r "$USERS" \
      FCALL tip_bench 3 u:__rand_int__ t:__rand_int____rand_int__ hist __rand_int__ __rand_int__ 2>/dev/null \
    | tr '\r' '\n' | awk '
      /requests per second/ && /throughput summary/ { rps = $3 }
      /^ *[0-9.]+% <= [0-9.]+ milliseconds/ {
        p = $1; sub(/%/, "", p); v = $3 * 1000
        if (p + 0 >= 50 && p50 == "") p50 = v
        if (p + 0 >= 99 && p99 == "") p99 = v
        if (p + 0 >= 99.9 && p999 == "") p999 = v }
      END { printf "%.0f %.0f %.0f %.0f\n", rps, p50, p99, p999 }'
}
if want redis; then
  for mode in always everysec; do
    rm -rf "$BASE/redis"; mkdir -p "$BASE/redis"
    redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --protected-mode yes --dir "$BASE/redis" --save '' \
      --appendonly yes --appendfsync "$mode" --logfile "$BASE/redis/redis.log" --daemonize no &
    REDIS_PID=$!
    for _ in $(seq 100); do R ping >/dev/null 2>&1 && break; sleep 0.1; done
    sed -e "s/__HOT__/$HOT/" -e "s/__NS__/$STREAMERS/" -e "s/__TIPMAX__/$TIPMAX/" "$PEERS/redis_wallet.lua" \
      | R -x FUNCTION LOAD REPLACE >/dev/null
    R FCALL init 0 "$USERS" "$STREAMERS" "$COINS" >/dev/null
    for p in 1 32; do
      read -r cal _ <<< "$(redis_bench "$p" 20000)"
      n=$(awk -v r="${cal:-1000}" -v s="$SECS" 'BEGIN{n=int(r*s); if(n<20000)n=20000; print n}')
      read -r rps p50 p99 p999 <<< "$(redis_bench "$p" "$n")"
      read -r su ss _ <<< "$(R FCALL_RO total 0 "$USERS" "$STREAMERS" | tr '\n' ' ')"
      cons=$([ $(( su + ss )) -eq $(( USERS * COINS )) ] && echo ok || echo BROKEN)
      log "redis appendfsync=$mode -P $p: $rps tips/s p50 $p50 p99 $p99 p99.9 $p999 us, money $cons"
      ROWS+=("Redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/') AOF $mode|50 clients, pipeline $p|$rps|$p50|$p99|$p999|conserved=$cons")
    done
    kill "$REDIS_PID"; wait "$REDIS_PID" 2>/dev/null || true; REDIS_PID=""
  done
fi

# ---- PostgreSQL --------------------------------------------------------------------------------------
if want pg; then
  PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  id postgres >/dev/null 2>&1 || useradd --system --home-dir "$BASE/pg" --shell /usr/sbin/nologin postgres
  rm -rf "$BASE/pg"; mkdir -p "$BASE/pg/sock" "$BASE/pg/logs"; chown -R postgres: "$BASE/pg"; chmod 755 "$BASE" "$BASE/pg"
  PG_DATA=$BASE/pg/data
  runuser -u postgres -- "$PGBIN/initdb" -D "$PG_DATA" -U postgres --auth=trust --no-locale -E UTF8 >/dev/null
  cat >> "$PG_DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$BASE/pg/sock'
shared_buffers = 2GB
max_wal_size = 8GB
checkpoint_timeout = 30min
synchronous_commit = on
CONF
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PG_DATA" -l "$BASE/pg/server.log" -w -t 120 start >/dev/null
  PSQL=("$PGBIN/psql" -h "$HOST" -p "$PG_PORT" -U postgres -X -q -v ON_ERROR_STOP=1)
  "${PSQL[@]}" -d postgres -c "CREATE DATABASE wallet"
  "${PSQL[@]}" -d wallet -v users="$USERS" -v bal="$COINS" -v streamers="$STREAMERS" -f "$PEERS/pg_wallet.sql" >/dev/null
  "${PSQL[@]}" -d wallet -c CHECKPOINT
  out=$(timeout $(( SECS + 120 )) "$PGBIN/pgbench" -h "$HOST" -p "$PG_PORT" -U postgres -n -M prepared -c 16 -j 2 \
        -T "$SECS" -D users="$USERS" -D streamers="$STREAMERS" -D hotpct="$HOT" -D tipmax="$TIPMAX" \
        -f "$PEERS/pg_tip.pgbench" --log --log-prefix="$BASE/pg/logs/tip" wallet 2>&1) || true
  tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial.*/\1/p' <<< "$out" | awk '{printf "%.0f", $1}')
  read -r p50 p99 p999 <<< "$(cat "$BASE"/pg/logs/tip.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END{
      if (NR==0) {print "NA NA NA"; exit}
      i=int(NR*0.5); j=int(NR*0.99); k=int(NR*0.999); if(i<1)i=1; if(j<1)j=1; if(k<1)k=1; print a[i], a[j], a[k] }')"
  cons=$("$PGBIN/psql" -h "$HOST" -p "$PG_PORT" -U postgres -X -At -d wallet \
        -c "SELECT CASE WHEN sum(balance) = $USERS::bigint * $COINS THEN 'ok' ELSE 'BROKEN' END FROM accounts")
  log "postgres synchronous_commit=on: ${tps:-NA} tips/s p50 $p50 p99 $p99 p99.9 $p999 us, money $cons"
  ROWS+=("PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') synchronous_commit=on|pgbench 16 clients|${tps:-NA}|$p50|$p99|$p999|conserved=$cons")
fi

# ---- table -------------------------------------------------------------------------------------------
BEST=""
for row in "${ROWS[@]}"; do
  IFS='|' read -r sys _ tps _ <<< "$row"
  if [[ $sys == stormledger* ]] && [[ $tps =~ ^[0-9]+$ ]] && { [ -z "$BEST" ] || [ "$tps" -gt "$BEST" ]; }; then BEST=$tps; fi
done
{
  echo "gift storm, $USERS users, $STREAMERS streamers, ${HOT}% hot, tips 1..$TIPMAX coins, ${SECS}s per run, $(date -u +%Y-%m-%d), $(nproc) cores"
  echo
  echo "| system | load | tips/s | p50 us | p99 us | p99.9 us | check | best stormledger tips/s ÷ this |"
  echo "|---|---|---:|---:|---:|---:|---|---:|"
  for row in "${ROWS[@]}"; do
    IFS='|' read -r sys cfg tps p50 p99 p999 check <<< "$row"
    ratio=$(awk -v b="${BEST:-0}" -v t="$tps" 'BEGIN{ if (b>0 && t+0>0) printf "%.1fx", b/t; else print "-" }')
    echo "| $sys | $cfg | $tps | $p50 | $p99 | $p999 | $check | $ratio |"
  done
} | tee "$RESULTS"
