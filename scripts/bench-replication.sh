#!/usr/bin/env bash
# Replication figures: io-engines on 127.0.0.1..4 serving 256 MiB memory replicas, nexuses on 127.0.0.1 with 1, 2
# and 3 children (3 remote ones, or a local one and remote ones), nvmf-perf against each; QD1 latency of 3 replicas
# against 1 as the median of alternating rounds; then rebuild throughput
# with and without application I/O, and partial versus full rebuild for the same outage. Everything shares this
# machine's cores, so the figures include that contention. Usage: scripts/bench-replication.sh [seconds, default 10]
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-10}
cargo build --release --bins -q
B=./target/release
R=nqn.2026-11.io.keelson:replica-00000000-0000-4000-8000-0000000000
V=nqn.2026-11.io.keelson:vol-
LOG=$(mktemp -d)
PIDS=()
SPIN=()
trap 'kill ${PIDS[@]} ${SPIN[@]} 2>/dev/null || true' EXIT
engine() { # i, replica suffixes...
    local i=$1; shift
    local ex=()
    for s in "$@"; do ex+=(--export "nqn=${R}$i$s,memory=256MiB"); done
    $B/io-engine --node-name n$i --listen 127.0.0.$i:4420 --grpc 127.0.0.$i:10124 "${ex[@]}" > $LOG/e$i.log 2>&1 &
    PIDS+=($!)
}
engine 1 1 2 3 4 5
engine 2 2 3 4 5 6 7 8 9 a
engine 3 3 7
engine 4 7
sleep 1
k() { $B/keelctl engine --endpoint http://127.0.0.1:10124 "$@"; }
nx() { echo "00000000-0000-4000-8000-00000000b00$1"; }
loc() { echo "local:///${R}1$1"; }
rem() { echo "nvmf://127.0.0.$1:4420/${R}$1$2"; }
perf() { $B/nvmf-perf --addr 127.0.0.1:4420 --nqn "$V$1" --time "$T" "${@:2}" --target-pid ${PIDS[0]}; }

echo "## write cost by replica count (4 KiB random writes)"
k create-nexus "$(nx 1)" "$(loc 1)" >/dev/null
k create-nexus "$(nx 2)" "$(loc 2)" "$(rem 2 2)" >/dev/null
k create-nexus "$(nx 3)" "$(loc 3)" "$(rem 2 3)" "$(rem 3 3)" >/dev/null
k create-nexus "$(nx 6)" "$(rem 2 6)" >/dev/null
k create-nexus "$(nx 7)" "$(rem 2 7)" "$(rem 3 7)" "$(rem 4 7)" >/dev/null
for n in 1 2 3 6 7; do k publish-nexus "$(nx $n)" --allow-any-host >/dev/null; done
# Memory replicas are thin: the first write to each 1 MiB chunk allocates and zeroes it. Fill every volume first
# so the figures measure replication, not first touch.
prefill() { $B/nvmf-perf --addr 127.0.0.1:4420 --nqn "$V$1" --rw write --bs 128k --qd 8 --time 3 >/dev/null; }
for n in 1 2 3 6 7; do prefill "$(nx $n)"; done
for n in 6 7 1 2 3; do
    label="replicas=$n (1 local)"
    [ $n -gt 1 ] && label="replicas=$n (1 local + $((n - 1)) remote)"
    if [ $n = 6 ]; then label="replicas=1 (remote)"; fi
    if [ $n = 7 ]; then label="replicas=3 (3 remote)"; fi
    for qd in 1 32; do echo -n "$label "; perf "$(nx $n)" --rw randwrite --bs 4k --qd $qd | awk "NR==1"; done
done

echo "## QD1 write latency of 3 replicas against 1, alternating rounds of 2 s (ROUNDS, default 9)"
# Single runs swing widely here: five processes share two cores. Rounds alternate the volumes so drift hits them
# alike, and the median of the per-round ratios is the figure. Volume "3 remote, one engine" has its three
# replicas on engine 2 (three connections and subsystems, one process): the nexus's fan-out without a third
# engine process competing for the cores.
k create-nexus "$(nx 8)" "$(rem 2 8)" "$(rem 2 9)" "$(rem 2 a)" >/dev/null
k publish-nexus "$(nx 8)" --allow-any-host >/dev/null
prefill "$(nx 8)"
p50() { $B/nvmf-perf --addr 127.0.0.1:4420 --nqn "$V$1" --time 2 --rw randwrite --bs 4k --qd 1 | sed -n '1s/.* p50 \([0-9.]*\) .*/\1/p'; }
# KEEP_CPUS_AWAKE=1: one lowest-priority (SCHED_IDLE) spinner per CPU during the rounds, so no CPU ever idles.
# A diagnostic, not a mode of Keelson: in a VM whose guest does not halt-poll, a write that finds the CPUs idle
# pays for waking a halted vCPU at every hop, and the spinners show how much of the latency that is.
if [ -n "${KEEP_CPUS_AWAKE:-}" ]; then
    for _ in $(seq 1 "$(nproc)"); do chrt -i 0 sh -c 'while :; do :; done' & SPIN+=($!); done
    echo "(CPUs kept awake by $(nproc) SCHED_IDLE spinners)"
fi
r7=(); r8=(); pa=(); pb=(); pc=()
for r in $(seq 1 "${ROUNDS:-9}"); do
    a=$(p50 "$(nx 6)"); b=$(p50 "$(nx 7)"); c=$(p50 "$(nx 8)")
    echo "round $r p50 us: 1 remote $a, 3 remote (3 engines) $b, 3 remote (one engine) $c"
    pa+=("$a"); pb+=("$b"); pc+=("$c")
    r7+=("$(awk -v a="$a" -v b="$b" 'BEGIN{print b / a}')"); r8+=("$(awk -v a="$a" -v c="$c" 'BEGIN{print c / a}')")
done
median() { sort -g | awk '{a[NR]=$1} END {printf "%.2f", a[int((NR + 1) / 2)]}'; }
m() { printf '%s\n' "$@" | median; }
echo "median p50 us: 1 remote $(m "${pa[@]}"), 3 remote (3 engines) $(m "${pb[@]}"), 3 remote (one engine) $(m "${pc[@]}")"
echo "median p50 ratio against 1 remote: 3 engines $(printf '%s\n' "${r7[@]}" | median)x, one engine $(printf '%s\n' "${r8[@]}" | median)x"
if [ -n "${KEEP_CPUS_AWAKE:-}" ]; then
    kill "${SPIN[@]}"
    SPIN=()
fi

echo "## rebuild of a 256 MiB replica"
k create-nexus "$(nx 4)" "$(loc 4)" >/dev/null
k publish-nexus "$(nx 4)" --allow-any-host >/dev/null
prefill "$(nx 4)"
wait_rebuilds() { # uuid, count
    for _ in $(seq 1 600); do
        [ "$(k nexuses | awk -v u="$1" '$1=="nexus"{cur=$2} cur==u && $1=="rebuild"' | wc -l)" -ge "$2" ] && return 0
        sleep 0.2
    done
    echo "rebuild did not finish" >&2; return 1
}
k add-child "$(nx 4)" "$(rem 2 4)" >/dev/null
wait_rebuilds "$(nx 4)" 1
echo "idle:      $(k nexuses | awk -v u="$(nx 4)" '$1=="nexus"{cur=$2} cur==u && $1=="rebuild"' | tail -1)"
echo -n "app, 2 replicas, no rebuild:     "
perf "$(nx 4)" --rw randwrite --bs 4k --qd 32 | awk "NR==1"
k remove-child "$(nx 4)" "$(rem 2 4)" >/dev/null
k add-child "$(nx 4)" "$(rem 2 5)" >/dev/null
echo -n "app, 2 replicas, one rebuilding: "
perf "$(nx 4)" --rw randwrite --bs 4k --qd 32 | awk "NR==1"
wait_rebuilds "$(nx 4)" 2
echo "under I/O: $(k nexuses | awk -v u="$(nx 4)" '$1=="nexus"{cur=$2} cur==u && $1=="rebuild"' | tail -1)"
echo "(this rebuild overlaps about a second of the application's $T s, so the IOPS above barely show its cost;"
echo " scripts/bench-rebuild.sh measures the trade-off, on pools, while both run the whole time)"

echo "## partial versus full rebuild after the same outage (about 1 % rewritten)"
k fault-child "$(nx 4)" "$(rem 2 5)" --reason bench >/dev/null
$B/nvmf-perf --addr 127.0.0.1:4420 --nqn "$V$(nx 4)" --rw randwrite --bs 4k --qd 16 --size 2560KiB --time 2 >/dev/null
k add-child "$(nx 4)" "$(rem 2 5)" >/dev/null
wait_rebuilds "$(nx 4)" 3
echo "partial:   $(k nexuses | awk -v u="$(nx 4)" '$1=="nexus"{cur=$2} cur==u && $1=="rebuild"' | tail -1)"
echo "full (same volume, idle, from above): see 'idle' line"
