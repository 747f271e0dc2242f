#!/bin/bash
# Instructions per registration of one node of a running cluster, under callgrind.
#
# usage: crates/bench/scripts/callgrind_node.sh DIR [PORT] [NODE]
#   DIR holds the `shoal` and `shoal-bench` binaries to measure (release builds);
#   NODE is the node measured, 2 by default (an owner and a copy; 1 is the sessions' home).
#
# Starts `shoal dev --nodes 3` (QUIC ports PORT, PORT+10, PORT+20; default 7600), kills
# node-NODE and starts it again under `valgrind --tool=callgrind` with its own command
# line (the others stay native), then registers 4 sessions x 500 and, after a dump, 4 x
# 2 000 through node-1 (4 in flight, 100 services; each run's sessions end with it).
# Prints the node's instructions per registration as the difference of the two dumps over
# the 6 000 registrations between the two sizes, so that start-up and idle time cancel.
# Needs valgrind (apt-get install valgrind). docs/benchmarks.md, thirty-first series.
set -eu
B=$(cd "$1" && pwd)
PORT=${2:-7600}
NODE=${3:-2}
D=$(mktemp -d /tmp/shoal-callgrind.XXXXXX)
cd "$D"
"$B/shoal" dev --nodes 3 --dir "$D" --base-port "$PORT" > "$D/dev.out" 2>&1 &
DEV=$!
trap 'kill $DEV 2>/dev/null || true; [ -n "${VG:-}" ] && kill $VG 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do grep -q "running" "$D/dev.out" && break; sleep 1; done
PID=$(pgrep -f "node-id node-$NODE .*$D" | head -1)
mapfile -d '' -t CMD < "/proc/$PID/cmdline"
kill -9 "$PID"
sleep 1
valgrind --tool=callgrind --callgrind-out-file="$D/cg.out.%p" "${CMD[@]}" > "$D/valgrind.out" 2>&1 &
VG=$!
sleep 25
callgrind_control -z "$VG" > /dev/null
run() {
    "$B/shoal-bench" single-node --servers "127.0.0.1:$PORT" --ca "$D/ca.pem" --sessions 4 \
        --instances-per-session "$1" --services 100 --concurrency 4 --query-seconds 0 \
        > "$D/bench-$1.out" 2>&1
    sleep 8
    callgrind_control -d "$VG" > /dev/null
    sleep 2
}
run 500
run 2000
small=$(grep -h '^summary' "$D/cg.out.$VG.1" | awk '{print $2}')
large=$(grep -h '^summary' "$D/cg.out.$VG.2" | awk '{print $2}')
echo "node-$NODE: $small instructions over 4 x 500, $large over 4 x 2 000"
echo "node-$NODE: $(( (large - small) / 6000 )) instructions per registration"
echo "(callgrind output and logs in $D)"
