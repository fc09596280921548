# Shared helpers for scripts/bench-peers.sh. Only /tmp paths; nothing leaves 127.0.0.0/8.

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# median of the numbers given as arguments
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{ if (NR==0) {print "NA"} else if (NR%2) {print a[(NR+1)/2]} else {printf "%.1f\n", (a[NR/2]+a[NR/2+1])/2} }'; }

# Disk sync latency under $1 (default /tmp): 300 x 8 KiB O_DSYNC writes; prints microseconds per write.
fsync_probe() {
  local d=${1:-/tmp} f t0 t1
  f=$d/.fsync_probe.$$
  t0=$(date +%s%N)
  dd if=/dev/zero of="$f" bs=8k count=300 oflag=dsync status=none 2>/dev/null || { echo NA; return; }
  t1=$(date +%s%N); rm -f "$f"
  echo $(( (t1 - t0) / 300 / 1000 ))
}

# Field of a one-line JSON object: jfield NAME JSON (numbers, booleans, strings without commas).
jfield() { sed -n "s/.*\"$1\":\"\{0,1\}\([^,}\"]*\).*/\1/p" <<< "$2"; }
