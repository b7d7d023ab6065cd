#!/usr/bin/env bash
# The cost of replication: one nexus engine fanning 4 KiB writes out to 1, 2 and 3 remote memory replicas, each on
# its own io-engine, against the bare TCP round trip measured in the same run. Prints QD1 p50/p99 (median of
# alternating rounds) and QD32 IOPS per replica count with the ratios to one replica, where a write's time goes in
# the nexus engine (the sampled stage timings it exports, keelson_io_stage_seconds), its CPU and context switches
# per write, one engine on one core at QD32, and the idle CPU of the engines.
#
# With 14 cores or more every process is pinned to its own cores (client 0-1, nexus engine 2-5 or NEXUS_CORES, replica engines
# 6-7, 8-9, 10-11, the one-core engine 12, its client 13-14); with fewer nothing is pinned and the figures include
# the processes' contention for the cores.
# Usage: scripts/bench-fanout.sh [seconds per run, default 5]; ROUNDS (default 3) QD1 rounds; KEELSON_BIN: use the
# binaries in that folder instead of building (the lent 16-core machine has no toolchain).
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-5}
# Time the hypervisor gave this machine's CPUs to others (/proc/stat "steal"), reported for the whole run at the end.
steal() { awk '/^cpu / {print $9}' /proc/stat; }
STEAL0=$(steal)
START=$SECONDS
ROUNDS=${ROUNDS:-3}
if [ -n "${KEELSON_BIN:-}" ]; then B=$KEELSON_BIN; else cargo build --release --bins -q; B=./target/release; fi
PIN=0
[ "$(nproc)" -ge 14 ] && command -v taskset >/dev/null && PIN=1
pin() { if [ $PIN = 1 ]; then taskset -c "$@"; else shift; "$@"; fi; }
# In the background, as `(spawn CORES CMD...) &`: the process keeps the PID that $! names.
spawn() { if [ $PIN = 1 ]; then exec taskset -c "$@"; else shift; exec "$@"; fi; }
R=nqn.2026-11.io.keelson:replica-00000000-0000-4000-8000-0000000000
V=nqn.2026-11.io.keelson:vol-
LOG=$(mktemp -d)
PIDS=()
trap 'kill ${PIDS[@]} 2>/dev/null || true' EXIT
engine() { # cores, index, extra args...
    local cores=$1 i=$2
    shift 2
    (spawn "$cores" $B/io-engine --node-name n$i --listen 127.0.0.$i:4420 --grpc 127.0.0.$i:10124 \
        --metrics 127.0.0.$i:9124 "$@" > $LOG/e$i.log 2>&1) &
    PIDS+=($!)
}
ex() { echo "--export nqn=${R}$1,memory=256MiB"; }
# shellcheck disable=SC2046
engine "${NEXUS_CORES:-2-5}" 1
engine 6-7 2 $(ex 21) $(ex 22) $(ex 23)
engine 8-9 3 $(ex 32) $(ex 33)
engine 10-11 4 $(ex 43)
engine 12 5 --export "nqn=${V}00000000-0000-4000-8000-00000000be0c,memory=1GiB"
NEXUS_PID=${PIDS[0]}
sleep 1
k() { $B/keelctl engine --endpoint http://127.0.0.1:10124 "$@"; }
nx() { echo "00000000-0000-4000-8000-00000000f00$1"; }
rem() { echo "nvmf://127.0.0.$1:4420/${R}$1$2"; }
k create-nexus "$(nx 1)" "$(rem 2 1)" >/dev/null
k create-nexus "$(nx 2)" "$(rem 2 2)" "$(rem 3 2)" >/dev/null
k create-nexus "$(nx 3)" "$(rem 2 3)" "$(rem 3 3)" "$(rem 4 3)" >/dev/null
for n in 1 2 3; do k publish-nexus "$(nx $n)" --allow-any-host >/dev/null; done
perf() { pin 0-1 $B/nvmf-perf --addr 127.0.0.1:4420 --nqn "$V$(nx $1)" "${@:2}"; }
# Memory replicas are thin: the first write to each 1 MiB chunk allocates it. Fill them first.
for n in 1 2 3; do perf $n --rw write --bs 128k --qd 8 --time 3 >/dev/null; done

echo "## machine: $(nproc) CPUs, pinned: $([ $PIN = 1 ] && echo yes || echo no), $T s per run"
(spawn 2 $B/nvmf-perf --pingpong-server --addr 127.0.0.1:5301 > /dev/null) &
PIDS+=($!)
sleep 0.3
pp=$(pin 0 $B/nvmf-perf --pingpong --addr 127.0.0.1:5301 --time "$T")
echo "$pp"
PP50=$(echo "$pp" | sed -n 's/.* p50 \([0-9.]*\) .*/\1/p')

# Nexus engine counters: CPU ticks, context switches and run-queue wait of all its threads.
ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
ctxsw() { cat /proc/$1/task/*/status | awk '/ctxt_switches/{s += $2} END {printf "%d", s}'; }
rqwait() { cat /proc/$1/task/*/schedstat | awk '{s += $2} END {printf "%d", s}'; }
scrape() { # bash's /dev/tcp: the lent machine may have no curl
    exec 3<>/dev/tcp/127.0.0.1/9124
    printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
    grep '^keelson_io_stage_seconds' <&3 || true
    exec 3<&-
}
# Mean and median of each stage between two scrapes, in microseconds.
stages() {
    awk '
        FNR == 1 { f++ }
        /_bucket\{/ { match($0, /stage="[a-z_]+"/); s = substr($0, RSTART + 7, RLENGTH - 8)
                      match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5)
                      if (f == 1) b0[s, le] = $NF; else { d = $NF - b0[s, le]; if (le != "+Inf") { bk[s, ++nb[s]] = le; bc[s, nb[s]] = d } } }
        /_sum\{/ { match($0, /stage="[a-z_]+"/); s = substr($0, RSTART + 7, RLENGTH - 8); if (f == 1) s0[s] = $NF; else sum[s] = $NF - s0[s] }
        /_count\{/ { match($0, /stage="[a-z_]+"/); s = substr($0, RSTART + 7, RLENGTH - 8); if (f == 1) c0[s] = $NF; else { cnt[s] = $NF - c0[s]; order[++no] = s } }
        END {
            for (i = 1; i <= no; i++) { s = order[i]; if (cnt[s] == 0) continue
                med = ""; for (j = 1; j <= nb[s]; j++) if (bc[s, j] >= cnt[s] / 2) { med = bk[s, j] * 1e6; break }
                printf "    %-18s mean %7.1f us  median <= %6.1f us  (%d samples)\n", s, sum[s] / cnt[s] * 1e6, med, cnt[s] }
        }' "$1" "$2"
}
# One run with the nexus engine's counters around it: prints perf's first line, then the engine's figures.
measured() { # replicas, perf args...
    local n=$1 a b
    shift
    scrape > $LOG/m0
    local t0 c0 w0
    t0=$(ticks $NEXUS_PID); c0=$(ctxsw $NEXUS_PID); w0=$(rqwait $NEXUS_PID)
    out=$(perf "$n" --time "$T" "$@")
    a=$(ticks $NEXUS_PID); b=$(ctxsw $NEXUS_PID)
    local w1
    w1=$(rqwait $NEXUS_PID)
    scrape > $LOG/m1
    iops=$(echo "$out" | sed -n '1s/.*: \([0-9]*\) IOPS.*/\1/p')
    ios=$(( iops * (T + 1) ))
    echo "$out" | head -1
    awk -v t=$((a - t0)) -v c=$((b - c0)) -v w=$((w1 - w0)) -v n="$ios" 'BEGIN {
        printf "  nexus engine: CPU %.1f us per write, %.2f context switches per write, run-queue wait %.1f us per write (approx.)\n",
            t * 10000 / n, c / n, w / 1000 / n }'
    [ -n "${BREAKDOWN:-}" ] && stages $LOG/m0 $LOG/m1
    return 0
}

echo "## 4 KiB random writes, nexus with 1, 2, 3 remote replicas (each replica engine on its own cores)"
declare -A P50 P99 IOPS
for r in $(seq 1 "$ROUNDS"); do
    for n in 1 2 3; do
        line=$(perf $n --rw randwrite --bs 4k --qd 1 --time "$T" | head -1)
        P50[$n]="${P50[$n]:-} $(echo "$line" | sed -n 's/.* p50 \([0-9.]*\) .*/\1/p')"
        P99[$n]="${P99[$n]:-} $(echo "$line" | sed -n 's/.* p99 \([0-9.]*\) .*/\1/p')"
    done
done
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR + 1) / 2)]}'; }
for n in 1 2 3; do
    echo "replicas=$n QD1 p50 us per round:${P50[$n]} -> median $(echo "${P50[$n]}" | median), p99 median $(echo "${P99[$n]}" | median)"
done
echo "### where a QD1 write's time goes (nexus engine; stages in block/timing.rs)"
for n in 1 3; do
    echo "replicas=$n"
    BREAKDOWN=1 measured $n --rw randwrite --bs 4k --qd 1
done
echo "### QD32"
for n in 1 2 3; do
    echo -n "replicas=$n "
    line=$(measured $n --rw randwrite --bs 4k --qd 32)
    echo "$line"
    IOPS[$n]=$(echo "$line" | sed -n '1s/.*: \([0-9]*\) IOPS.*/\1/p')
done
m1=$(echo "${P50[1]}" | median); m3=$(echo "${P50[3]}" | median)
echo "## summary"
awk -v pp="$PP50" -v a="$m1" -v b="$m3" -v i1="${IOPS[1]}" -v i3="${IOPS[3]}" 'BEGIN {
    printf "TCP ping-pong p50 %.1f us; 1 replica QD1 p50 %.1f us = %.2fx the round trip (aim <= 1.3x)\n", pp, a, a / pp
    printf "3 replicas / 1 replica: QD1 p50 %.2fx (aim <= 1.15x), QD32 IOPS %.2fx (aim >= 0.9x)\n", b / a, i3 / i1 }'

echo "## one engine on one core (core 12), client on 13-14, memory namespace, QD32 4 KiB"
one() { pin 13-14 $B/nvmf-perf --addr 127.0.0.5:4420 --nqn "${V}00000000-0000-4000-8000-00000000be0c" --time "$T" \
    --target-pid "${PIDS[4]}" --queues 2 "$@"; }
one --rw write --qd 8 --bs 128k >/dev/null
one --rw randread --bs 4k --qd 32 | head -2
one --rw randwrite --bs 4k --qd 32 | head -2

echo "## idle CPU, 10 s, three nexuses connected to their replicas, no I/O (10 ms ticks)"
all_ticks() { for p in "${PIDS[@]:0:5}"; do ticks "$p"; done | awk '{s += $1} END {print s}'; }
i0=$(all_ticks)
sleep 10
i1=$(all_ticks)
echo "five io-engines: $((i1 - i0)) ticks"
awk -v t="$(($(steal) - STEAL0))" -v s="$((SECONDS - START))" -v n="$(nproc)" 'BEGIN {
    printf "host steal: the hypervisor took %.1f %% of this machine during the run (figures above 5 %% are not the software alone)\n", s ? t / (n * s) : 0 }'
