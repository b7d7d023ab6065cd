#!/usr/bin/env bash
# Measures Keelson's data path on this machine: our initiator (nvmf-perf) against io-engine with a memory
# namespace over loopback, io-engine pinned to one core and nvmf-perf to the other; next to it, the loopback limits
# that iperf3 and sockperf measure with the same pinning, and the CPU an idle io-engine burns.
# Usage: scripts/bench.sh [seconds per workload, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-10}
for p in iperf3 sockperf; do
    command -v $p >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $p; }
done
cargo build --release --bins -q
NQN=nqn.2026-11.io.keelson:vol-00000000-0000-4000-8000-00000000be0c
ENGINE_CORE=1 CLIENT_CORE=0
taskset -c $ENGINE_CORE ./target/release/io-engine --listen 127.0.0.1:4420 --grpc 127.0.0.1:10198 \
    --export "nqn=$NQN,memory=1GiB" > /tmp/keelson-bench-engine.log 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
sleep 1
ticks() { awk '{print $14 + $15}' /proc/$1/stat; }

echo "## loopback limits (taskset: server core $ENGINE_CORE, client core $CLIENT_CORE)"
taskset -c $ENGINE_CORE iperf3 -s -1 -p 5299 >/dev/null 2>&1 &
sleep 0.5
taskset -c $CLIENT_CORE iperf3 -c 127.0.0.1 -p 5299 -t "$T" | awk '/receiver/{print "iperf3 TCP stream: " $7, $8}'
taskset -c $ENGINE_CORE sockperf server --tcp -i 127.0.0.1 -p 11111 >/dev/null 2>&1 &
SP=$!
sleep 0.5
taskset -c $CLIENT_CORE sockperf ping-pong --tcp -i 127.0.0.1 -p 11111 -t "$T" -m 64 2>&1 |
    sed 's/\x1b\[[0-9;]*m//g' | awk '/avg-latency/{print "sockperf TCP ping-pong 64 B, one-way: " $0} /percentile 50.000 /{print "  p50 " $NF " us"} /percentile 99.000 /{print "  p99 " $NF " us"}'
kill $SP 2>/dev/null || true

echo "## idle io-engine CPU (10 ms ticks; 0 = not measurable)"
a=$(ticks $PID); sleep 10; b=$(ticks $PID)
echo "no host connected, 10 s: $((b - a)) ticks"
taskset -c $CLIENT_CORE ./target/release/nvmf-perf --nqn "$NQN" --idle --queues 2 --time 10 --target-pid $PID

echo "## nvmf-perf -> io-engine (memory namespace), $T s each"
run() { taskset -c $CLIENT_CORE ./target/release/nvmf-perf --nqn "$NQN" --time "$T" --target-pid $PID "$@"; }
run --rw randread --bs 4k --qd 1
run --rw randwrite --bs 4k --qd 1
run --rw randread --bs 4k --qd 32
run --rw randwrite --bs 4k --qd 32
run --rw read --bs 128k --qd 8
run --rw write --bs 128k --qd 8
echo "with header and data digests:"
run --rw randread --bs 4k --qd 32 --digests
run --rw read --bs 128k --qd 8 --digests
