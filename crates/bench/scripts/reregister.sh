#!/bin/bash
# A fleet's restart, on a fresh local cluster: every instance leaves and comes back
# within the tombstones' lifetime (60 s).
#
#     crates/bench/scripts/reregister.sh BIN_DIR TAG
#
# BIN_DIR holds `shoal` and `shoal-bench` (target/release, or a copy of them). Starts
# `shoal dev` (ports 7400-7421, directory /tmp/rr-TAG), then runs `shoal-bench
# single-node` against its three nodes twice: 100 sessions x 1 400 instances over 100
# services, 4 requests in flight per session, each session homed on a node at random.
# Round 1 registers into an empty cluster and ends with every session saying goodbye,
# which deletes every instance (one tombstone each). Round 2 registers the same
# instances again. Prints both rounds' registrations/s and the three nodes' CPU per
# 1 000 registrations (`utime + stime` from /proc, goodbye included), then stops the
# cluster.
set -eu
B=$1
TAG=$2
D=/tmp/rr-$TAG
rm -rf "$D"
mkdir -p "$D"
"$B/shoal" dev --dir "$D/c" >"$D/dev.log" 2>&1 &
DEV=$!
trap 'kill $DEV 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    grep -q "Ctrl-C stops" "$D/dev.log" && break
    sleep 0.5
done
PIDS=$(pgrep -f "shoal server --node-id node-. --data-dir $D/c" | tr '\n' ' ')
cpu() {
    local s=0
    for p in $PIDS; do
        s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$s"
}
round() {
    "$B/shoal-bench" single-node --servers 127.0.0.1:7400,127.0.0.1:7410,127.0.0.1:7420 \
        --ca "$D/c/ca.pem" --sessions 100 --instances-per-session 1400 --services 100 \
        --concurrency 4 --query-seconds 0 --query-clients 1 --out "$D/$1.json" >"$D/$1.log" 2>&1
}
rate() { grep -m1 "registrations/s" "$D/$1.log" | sed 's/.*: //'; }
# CPU in clock ticks (100 a second) over 140 000 registrations, as ms per 1 000.
per1000() { echo "scale=2; ($2 - $1) * 10 / 140" | bc; }
a=$(cpu)
round r1
sleep 3
b=$(cpu)
round r2
c=$(cpu)
echo "$TAG round1 $(rate r1) node cpu/1000 $(per1000 "$a" "$b") ms | round2 $(rate r2) node cpu/1000 $(per1000 "$b" "$c") ms"
