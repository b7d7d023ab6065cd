#!/usr/bin/env bash
# io-engine against SPDK's nvmf_tgt, side by side in one run. Each target in turn on TARGET_CORE (default 0) with a
# 512 MiB RAM namespace over loopback; the initiator on CLIENT_CORE (default 1). Rounds alternate the targets and the
# table shows medians: IOPS, p50 latency, and the target's CPU per I/O (from /proc ticks, so the same measure for
# both). Initiators: nvmf-perf always, SPDK's spdk_nvme_perf too when it is there. Then each target's CPU over 10 idle
# seconds, and io-engine's CPU per 4 KiB read against a write's.
#
# SPDK is not a dependency of Keelson and no package registry here ships it. Point SPDK_DIR at an SPDK build tree
# (build/bin/nvmf_tgt, build/bin/spdk_nvme_perf, scripts/rpc.py), or set SPDK_NVMF_TGT, SPDK_PERF and SPDK_RPC; extra
# arguments in SPDK_TGT_ARGS / SPDK_PERF_ARGS (e.g. "--no-huge -s 1024" where there are no hugepages). Without SPDK
# the io-engine half runs alone and prints the same table.
#
# Usage: scripts/bench-vs-spdk.sh [SECONDS per run, default 5] [ROUNDS, default 3]
#   KEELSON_BIN directory with io-engine and nvmf-perf (default: a release build here)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-5}
ROUNDS=${2:-3}
if [ -n "${KEELSON_BIN:-}" ]; then B=$KEELSON_BIN; else cargo build --release --bins -q; B=./target/release; fi
TC=${TARGET_CORE:-0}
CC=${CLIENT_CORE:-1}
if [ "$(nproc)" -lt 2 ]; then TC=0 CC=0; fi
NQN=nqn.2026-11.io.keelson:vol-00000000-0000-4000-8000-0000000055dc
HOSTNQN=nqn.2026-11.io.keelson:host-bench
PORT=4440
SPDK_NVMF_TGT=${SPDK_NVMF_TGT:-${SPDK_DIR:+$SPDK_DIR/build/bin/nvmf_tgt}}
SPDK_PERF=${SPDK_PERF:-${SPDK_DIR:+$SPDK_DIR/build/bin/spdk_nvme_perf}}
SPDK_RPC=${SPDK_RPC:-${SPDK_DIR:+$SPDK_DIR/scripts/rpc.py}}
HAVE_SPDK=0
if [ -n "$SPDK_NVMF_TGT" ] && [ -x "$SPDK_NVMF_TGT" ] && [ -n "$SPDK_RPC" ] && [ -e "$SPDK_RPC" ]; then HAVE_SPDK=1; fi
HAVE_SPDK_PERF=0
if [ -n "$SPDK_PERF" ] && [ -x "$SPDK_PERF" ]; then HAVE_SPDK_PERF=1; fi
DIR=$(mktemp -d)
RES=$DIR/results.jsonl
: > "$RES"
TPID=""
cleanup() {
    if [ -n "$TPID" ]; then kill "$TPID" 2>/dev/null || true; wait "$TPID" 2>/dev/null || true; fi
    rm -rf "$DIR"
}
trap cleanup EXIT

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Time the hypervisor gave this machine's CPUs to others (/proc/stat "steal", all CPUs): a run that lost more than
# 5 % of the machine to it is left out of the medians when its workload has cleaner runs.
steal() { awk '/^cpu / {print $9}' /proc/stat; }
mask() { printf '0x%x' $((1 << $1)); }

start_target() { # io-engine | spdk
    if [ "$1" = io-engine ]; then
        taskset -c "$TC" "$B/io-engine" --listen 127.0.0.1:$PORT --grpc 127.0.0.1:10199 \
            --export "nqn=$NQN,memory=512MiB" > "$DIR/io-engine.log" 2>&1 &
        TPID=$!
        local up=0
        for _ in $(seq 1 50); do if (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null; then up=1; break; fi; sleep 0.1; done
        if [ $up = 0 ]; then cat "$DIR/io-engine.log"; exit 1; fi
        # Written once through, as SPDK's malloc bdev is backed from the start: a RAM namespace's memory is
        # allocated on first write, and a first touch of each page costs a page fault that no steady state has.
        taskset -c "$CC" "$B/nvmf-perf" --addr 127.0.0.1:$PORT --nqn "$NQN" --rw write --bs 128k --qd 8 --time 1 \
            > /dev/null
        return 0
    fi
    local sock=$DIR/spdk.sock
    # shellcheck disable=SC2086
    "$SPDK_NVMF_TGT" -m "$(mask "$TC")" -r "$sock" ${SPDK_TGT_ARGS:-} > "$DIR/spdk.log" 2>&1 &
    TPID=$!
    for _ in $(seq 1 100); do [ -S "$sock" ] && break; sleep 0.1; done
    rpc() { "$SPDK_RPC" -s "$sock" "$@" > /dev/null; }
    rpc framework_wait_init 2>/dev/null || sleep 1
    rpc nvmf_create_transport -t TCP
    rpc bdev_malloc_create -b Malloc0 512 4096
    rpc nvmf_create_subsystem "$NQN" -a -s SPDK0000000000000001
    rpc nvmf_subsystem_add_ns "$NQN" Malloc0
    rpc nvmf_subsystem_add_listener "$NQN" -t tcp -f ipv4 -a 127.0.0.1 -s $PORT
}
stop_target() { kill "$TPID" 2>/dev/null || true; wait "$TPID" 2>/dev/null || true; TPID=""; }

# One run: TARGET INITIATOR RW BS QD -> one JSON line in $RES
run() {
    local target=$1 init=$2 rw=$3 bs=$4 qd=$5 a b s0 out
    a=$(ticks "$TPID")
    s0=$(steal)
    if [ "$init" = nvmf-perf ]; then
        out=$(taskset -c "$CC" "$B/nvmf-perf" --addr 127.0.0.1:$PORT --nqn "$NQN" --rw "$rw" --bs "$bs" --qd "$qd" \
            --time "$T" --json)
    else
        # shellcheck disable=SC2086
        out=$("$SPDK_PERF" -c "$(mask "$CC")" -q "$qd" -o $(( ${bs%k} * 1024 )) -w "$rw" -t "$((T + 1))" -L \
            -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$PORT subnqn:$NQN hostnqn:$HOSTNQN" ${SPDK_PERF_ARGS:-} 2>&1)
    fi
    b=$(ticks "$TPID")
    python3 - "$target" "$init" "$rw $bs qd$qd" "$((b - a))" "$T" "$init" "$out" "$(($(steal) - s0))" "$(nproc)" \
        >> "$RES" <<'EOF'
import json, re, sys
target, init, workload, ticks, secs, kind = sys.argv[1:7]
out = sys.argv[7]
steal_ticks, cpus = int(sys.argv[8]), int(sys.argv[9])
if kind == "nvmf-perf":
    d = json.loads(out)
    if d["errors"]:
        sys.exit(f"{target} {workload}: I/O errors: {d['errors']}")
    iops, p50 = d["iops"], d["lat_us"]["p50"]
    seconds = float(secs) + 1  # nvmf-perf warms up for a second, which the ticks include
else:
    total = re.search(r"^Total\s*:\s*([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    if not total:
        sys.exit(f"spdk_nvme_perf gave no total:\n{out}")
    iops = float(total.group(1))
    m = re.search(r"50\.00000%\s*:\s*([\d.]+)us", out)
    p50 = float(m.group(1)) if m else float(total.group(3))
    seconds = float(secs) + 1
ios = iops * seconds
print(json.dumps(dict(target=target, init=init, workload=workload, iops=iops, p50=p50,
                      cpu_us=int(ticks) * 10000 / ios if ios else 0,
                      steal=steal_ticks / (cpus * 100 * seconds))))
EOF
}

WORKLOADS=("randread 4k 1" "randwrite 4k 1" "randread 4k 32" "randwrite 4k 32" "read 128k 16" "write 128k 16")
TARGETS=(io-engine)
[ $HAVE_SPDK = 1 ] && TARGETS+=(spdk)
INITS=(nvmf-perf)
[ $HAVE_SPDK_PERF = 1 ] && INITS+=(spdk_nvme_perf)
echo "## $(nproc) CPUs; targets on core $TC, initiators on core $CC; $T s per run, $ROUNDS rounds; targets: ${TARGETS[*]}; initiators: ${INITS[*]}"
[ $HAVE_SPDK = 0 ] && echo "(SPDK not found: set SPDK_DIR, or SPDK_NVMF_TGT/SPDK_PERF/SPDK_RPC, for the side-by-side half)"
# The bare loopback TCP round trip between the two cores (64-byte ping-pong, p50): the floor under QD1 for a target
# that sleeps between commands, as each command wakes the other side once each way.
taskset -c "$TC" "$B/nvmf-perf" --pingpong-server --addr 127.0.0.1:$((PORT + 1)) &
PPSRV=$!
sleep 0.3
RTT=$(taskset -c "$CC" "$B/nvmf-perf" --pingpong --addr 127.0.0.1:$((PORT + 1)) --time 3 | sed -n 's/.* p50 \([0-9.]*\) .*/\1/p')
kill $PPSRV; wait $PPSRV 2>/dev/null || true
echo "loopback TCP round trip, core $TC <-> core $CC: p50 $RTT us"
echo "## TCP congestion control: the system's $(cat /proc/sys/net/ipv4/tcp_congestion_control); io-engine and nvmf-perf: --tcp-congestion ${KEELSON_TCP_CONGESTION:-auto} (auto: cubic where the system's is bbr)"
IDLE=""
for r in $(seq 1 "$ROUNDS"); do
    for target in "${TARGETS[@]}"; do
        echo "round $r: $target"
        start_target "$target"
        if [ "$r" = 1 ]; then
            a=$(ticks "$TPID"); sleep 10; b=$(ticks "$TPID")
            IDLE="$IDLE$target: $((b - a)) ticks in 10 idle s; "
        fi
        for init in "${INITS[@]}"; do
            for w in "${WORKLOADS[@]}"; do
                # shellcheck disable=SC2086
                run "$target" "$init" $w
            done
        done
        stop_target
    done
done

python3 - "$RES" "$RTT" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rtt = float(sys.argv[2] or 0)
NOISY = 0.05
def med(target, init, w, key):
    runs = [r for r in rows if (r["target"], r["init"], r["workload"]) == (target, init, w)]
    clean = [r for r in runs if r["steal"] <= NOISY]
    v = [r[key] for r in (clean or runs)]
    return statistics.median(v) if v else None
inits = list(dict.fromkeys(r["init"] for r in rows))
works = list(dict.fromkeys(r["workload"] for r in rows))
spdk = any(r["target"] == "spdk" for r in rows)
print()
print(f'{"workload":22} {"initiator":15} {"io-engine":32} {"SPDK nvmf_tgt":32} ratio')
for init in inits:
    for w in works:
        cells = []
        for t in ("io-engine", "spdk"):
            iops = med(t, init, w, "iops")
            if iops is None:
                cells.append("-")
                continue
            big = "128k" in w
            main = f'{iops * 128 / 1024 / 1000:6.2f} GB/s' if big else f'{iops / 1000:6.1f}k IOPS'
            cells.append(f'{main} p50 {med(t, init, w, "p50"):6.1f} us cpu {med(t, init, w, "cpu_us"):5.1f} us/IO')
        e, s = med("io-engine", init, w, "iops"), med("spdk", init, w, "iops")
        ratio = f"{e / s:.2f}" if e and s else "-"
        print(f"{w:22} {init:15} {cells[0]:32} {cells[1]:32} {ratio}")
for init in inits:
    r, w = med("io-engine", init, "randread 4k qd32", "cpu_us"), med("io-engine", init, "randwrite 4k qd32", "cpu_us")
    if r and w:
        print(f"io-engine CPU per 4 KiB I/O at QD32 ({init}): read {r:.1f} us, write {w:.1f} us, read/write {r / w:.2f}")
for init in inits:
    q1 = med("io-engine", init, "randread 4k qd1", "p50")
    if q1 and rtt:
        print(f"io-engine 4 KiB read QD1 p50 ({init}): {q1:.1f} us = {q1 / rtt:.2f}x the round trip ({rtt:.1f} us)")
if not spdk:
    print("(io-engine half only)")
noisy = [r for r in rows if r["steal"] > NOISY]
worst = max((r["steal"] for r in rows), default=0)
print(f"host steal: {len(noisy)} of {len(rows)} runs lost more than {NOISY:.0%} of the machine to the hypervisor"
      f" (worst {worst:.0%}); a workload's median uses only its cleaner runs when it has any")
EOF
echo "idle: $IDLE"
