#!/usr/bin/env bash
# Pool replicas against the disk under them. One io-engine with a pool on a file, a 2 GiB replica on it whose every
# cluster was written first, served over loopback to nvmf-perf; beside it, in the same minutes, fio with O_DIRECT
# (libaio and io_uring) on a 2 GiB file of the same file system. Then the same with the pool on a loop device
# (direct I/O to its file) and fio on that loop device. Workloads: 4 KiB random read and write at QD1 and QD32,
# 128 KiB sequential read and write at QD8; and the first writes to never-written clusters against overwrites.
# Prints a table with p50/p99 and the pool's ratio to fio's better engine, then where the engine's I/Os spent their
# time in each workload (mean of the sampled stages it exports, keelson_io_stage_seconds; see
# nvmf-target/src/block/timing.rs).
#
# Usage: scripts/bench-pool.sh [SECONDS per run, default 5]
#   BENCH_DIR   directory on the file system to measure (default /var/tmp/keelson-bench-pool; not tmpfs)
#   KEELSON_BIN directory with io-engine, nvmf-perf and keelctl (default: a release build here)
#   NO_LOOP=1   skip the loop-device half (it needs root and losetup)
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-5}
if [ -n "${KEELSON_BIN:-}" ]; then B=$KEELSON_BIN; else cargo build --release --bins -q; B=./target/release; fi
command -v fio >/dev/null || { echo "fio is not installed (scripts/install-deps.sh installs it)"; exit 1; }
DIR=${BENCH_DIR:-/var/tmp/keelson-bench-pool}
rm -rf "$DIR"
mkdir -p "$DIR"
RES=$DIR/results.jsonl
STAGES=$DIR/stages.txt
: > "$RES"
: > "$STAGES"
METRICS=127.0.0.1:9125
EPID=""
LOOP=""
cleanup() {
    [ -n "$EPID" ] && { kill "$EPID" 2>/dev/null; wait "$EPID" 2>/dev/null || true; }
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    rm -f "$DIR"/*.img "$DIR"/*.dat
}
trap cleanup EXIT
SIZE=$((2 << 30))
ADDR=127.0.0.1:4420
API=http://127.0.0.1:10124
A=00000000-0000-4000-8000-00000000a001
F=00000000-0000-4000-8000-00000000a002
NQN=nqn.2026-11.io.keelson:replica-
k() { $B/keelctl engine --endpoint $API "$@"; }

# Time the hypervisor gave this machine's CPUs to others (/proc/stat "steal", all CPUs), counted from `mark` to the
# end of the run that `record` takes in: a run that lost more than 5 % of the machine is flagged in the table.
steal() { awk '/^cpu / {print $9}' /proc/stat; }
mark() { S0=$(steal); T0=$(date +%s.%N); }
S0=0
T0=0

# record BACKEND WORKLOAD TOOL < one JSON result (nvmf-perf's or fio's), after a `mark`
record() {
    python3 -c '
import json, os, sys, time
backend, workload, tool = sys.argv[1:4]
d = json.load(sys.stdin)
steal = next(int(l.split()[8]) for l in open("/proc/stat") if l.startswith("cpu "))
steal = (steal - int(sys.argv[4])) / (os.cpu_count() * 100 * (time.time() - float(sys.argv[5])))
if "jobs" in d:
    j = d["jobs"][0]
    side = j["read"] if j["read"]["io_bytes"] > 0 else j["write"]
    # lat_ns: submission to completion, what an application waits (clat_ns leaves the submission out, 9 us of
    # the 27 us fio takes at QD1 here), as nvmf-perf measures its own latency.
    pct = side["lat_ns"].get("percentile", {})
    r = dict(iops=side["iops"], mbps=side["bw_bytes"] / 1e6,
             p50=pct.get("50.000000", 0) / 1000, p99=pct.get("99.000000", 0) / 1000)
    # How fio splits an I/O: handing it to the kernel, and from there to its completion in hand.
    r.update(slat=side["slat_ns"]["mean"] / 1000, clat=side["clat_ns"]["mean"] / 1000)
else:
    r = dict(iops=d["iops"], mbps=d["mb_per_s"], p50=d["lat_us"]["p50"], p99=d["lat_us"]["p99"],
             cpu_s=d.get("target_cpu_s"), secs=d.get("seconds"))
    if d["errors"]:
        sys.exit(workload + ": I/O errors: " + str(d["errors"]))
r.update(backend=backend, workload=workload, tool=tool, steal=steal)
print(json.dumps(r))
' "$@" "$S0" "$T0" >> "$RES"
}

# The bare loopback TCP round trip (64-byte ping-pong, p50 us), unpinned like the runs: the floor under QD1.
pingpong() {
    $B/nvmf-perf --pingpong-server --addr 127.0.0.1:4429 &
    local pp=$!
    sleep 0.3
    $B/nvmf-perf --pingpong --addr 127.0.0.1:4429 --time 3 | sed -n 's/.* p50 \([0-9.]*\) .*/\1/p'
    kill $pp
    wait $pp 2>/dev/null || true
}

# The engine's stage histograms (bash's /dev/tcp: no curl needed).
scrape() {
    exec 3<>/dev/tcp/${METRICS%:*}/${METRICS#*:}
    printf 'GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n' "$METRICS" >&3
    grep '^keelson_io_stage_seconds_\(sum\|count\)' <&3 || true
    exec 3<&-
}
# stages BACKEND WORKLOAD BEFORE AFTER: one line of mean microseconds per stage between two scrapes
stages() {
    awk -v name="$1: $2" '
        FNR == 1 { f++ }
        { match($0, /stage="[a-z_]+"/); s = substr($0, RSTART + 7, RLENGTH - 8) }
        /_sum\{/ { if (f == 1) s0[s] = $NF; else sum[s] = $NF - s0[s] }
        /_count\{/ { if (f == 1) c0[s] = $NF; else { cnt[s] = $NF - c0[s]; order[++n] = s } }
        END { line = sprintf("%-24s", name)
              for (i = 1; i <= n; i++) { s = order[i]; if (cnt[s] > 0) line = line sprintf(" %s %.0f", s, sum[s] / cnt[s] * 1e6) }
              print line }' "$3" "$4" >> "$STAGES"
}

# workload NAME: nvmf-perf's flags and fio's for it
declare -A PERF=(
    ["4k randread qd1"]="--rw randread --bs 4k --qd 1"
    ["4k randread qd32"]="--rw randread --bs 4k --qd 32"
    ["4k randwrite qd1"]="--rw randwrite --bs 4k --qd 1"
    ["4k randwrite qd32"]="--rw randwrite --bs 4k --qd 32"
    ["128k read qd8"]="--rw read --bs 128k --qd 8"
    ["128k write qd8"]="--rw write --bs 128k --qd 8"
)
declare -A FIO=(
    ["4k randread qd1"]="--rw=randread --bs=4k --iodepth=1"
    ["4k randread qd32"]="--rw=randread --bs=4k --iodepth=32"
    ["4k randwrite qd1"]="--rw=randwrite --bs=4k --iodepth=1"
    ["4k randwrite qd32"]="--rw=randwrite --bs=4k --iodepth=32"
    ["128k read qd8"]="--rw=read --bs=128k --iodepth=8"
    ["128k write qd8"]="--rw=write --bs=128k --iodepth=8"
)
ORDER=("4k randread qd1" "4k randread qd32" "4k randwrite qd1" "4k randwrite qd32" "128k read qd8" "128k write qd8")

# fio_runs BACKEND TARGET: every workload with both engines on TARGET (a file, or a block device)
fio_runs() {
    for w in "${ORDER[@]}"; do
        for e in libaio io_uring; do
            mark
            # shellcheck disable=SC2086
            fio --name=b --filename="$2" --size=$SIZE --direct=1 --ioengine=$e ${FIO[$w]} --lat_percentiles=1 --time_based \
                --runtime="$T" --ramp_time=1 --norandommap --randrepeat=0 --output-format=json 2>/dev/null |
                record "$1" "$w" "fio $e"
        done
    done
    # What first writes cannot beat: a new cluster's mapping is durable before its write is acknowledged, which
    # takes a flush per 4 MiB cluster (or per few, mapped ahead); fio's same writes with an fdatasync every 4 MiB.
    # On a virtual disk whose host caches writes, a flush writes back all written since the last one (0.8 ms per
    # MiB on the project's VM): first writes go at the host's write-back speed, overwrites at its cache's.
    mark
    fio --name=b --filename="$2" --size=$SIZE --direct=1 --ioengine=io_uring --rw=write --bs=128k --iodepth=8 --lat_percentiles=1 \
        --fdatasync=32 --time_based --runtime="$T" --ramp_time=1 --output-format=json 2>/dev/null |
        record "$1" "128k write qd8, new clusters" "fio io_uring"
}

# engine_runs BACKEND DISK: a pool on DISK, the replica filled, every workload; then first writes
engine_runs() {
    $B/io-engine --node-name bench --listen $ADDR --grpc 127.0.0.1:10124 --metrics $METRICS --pool "pool0=$2" \
        > "$DIR/engine.log" 2>&1 &
    EPID=$!
    for _ in $(seq 1 100); do k pool list >/dev/null 2>&1 && break; sleep 0.1; done
    k replica create pool0 $A 2GiB --share >/dev/null
    k replica create pool0 $F 2GiB --share >/dev/null
    echo "$1: filling the replica (every cluster allocated)"
    $B/nvmf-perf --addr $ADDR --nqn "$NQN$A" --rw write --bs 128k --qd 8 --time $((SIZE / (100 << 20) + 2)) >/dev/null
    for w in "${ORDER[@]}"; do
        scrape > "$DIR/m0"
        mark
        # shellcheck disable=SC2086
        $B/nvmf-perf --addr $ADDR --nqn "$NQN$A" --time "$T" --json --target-pid "$EPID" ${PERF[$w]} |
            record "$1" "$w" "io-engine pool"
        scrape > "$DIR/m1"
        stages "$1" "$w" "$DIR/m0" "$DIR/m1"
    done
    # First writes: every write lands in a cluster no one wrote yet (sequential, so each cluster is new once).
    mark
    $B/nvmf-perf --addr $ADDR --nqn "$NQN$F" --time "$T" --json --rw write --bs 128k --qd 8 |
        record "$1" "128k write qd8, new clusters" "io-engine pool"
    kill "$EPID"
    wait "$EPID" 2>/dev/null || true
    EPID=""
}

RTT=$(pingpong)
echo "## loopback TCP round trip p50: $RTT us"
echo "## TCP congestion control: the system's $(cat /proc/sys/net/ipv4/tcp_congestion_control); io-engine and nvmf-perf: --tcp-congestion ${KEELSON_TCP_CONGESTION:-auto} (auto: cubic where the system's is bbr)"
echo "## pool on a file in $DIR ($(df -T "$DIR" | awk 'NR==2 {print $2}'))"
truncate -s 5G "$DIR/pool.img"
engine_runs file "$DIR/pool.img"
rm -f "$DIR/pool.img"
echo "file: fio"
fio --name=layout --filename="$DIR/fio.dat" --size=$SIZE --rw=write --bs=1m --direct=1 --output=/dev/null
fio_runs file "$DIR/fio.dat"
rm -f "$DIR/fio.dat"

if [ -z "${NO_LOOP:-}" ]; then
    echo "## pool on a loop device (direct I/O to its file)"
    truncate -s 5G "$DIR/loop.img"
    LOOP=$(losetup -f --show --direct-io=on "$DIR/loop.img")
    echo "loop: fio on $LOOP"
    fio --name=layout --filename="$LOOP" --size=$SIZE --rw=write --bs=1m --direct=1 --output=/dev/null
    fio_runs loop "$LOOP"
    # fio left data everywhere: blank the label block so the pool can be made there.
    dd if=/dev/zero of="$LOOP" bs=1M count=1 oflag=direct status=none
    engine_runs loop "$LOOP"
fi

python3 - "$RES" "$RTT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rtt = float(sys.argv[2] or 0)
NOISY = 0.05
def fig(r):
    big = r["workload"].startswith("128k")
    main = f'{r["mbps"]:7.0f} MB/s' if big else f'{r["iops"] / 1000:7.1f}k IOPS'
    mark = "*" if r.get("steal", 0) > NOISY else " "
    return f'{main} p50 {r["p50"]:7.0f} p99 {r["p99"]:7.0f} us{mark}'
for backend in dict.fromkeys(r["backend"] for r in rows):
    print(f"\n### {backend}")
    print(f'{"workload":32} {"io-engine pool":38} {"fio libaio":38} {"fio io_uring":38} ratio')
    by = {(r["workload"], r["tool"]): r for r in rows if r["backend"] == backend}
    for w in dict.fromkeys(r["workload"] for r in rows if r["backend"] == backend):
        pool = by.get((w, "io-engine pool"))
        fios = [by[(w, t)] for t in ("fio libaio", "fio io_uring") if (w, t) in by]
        cells = [fig(x) if x else "-" for x in (pool, *fios)] + ["-"] * (3 - 1 - len(fios))
        ratio = "-"
        if pool and fios:
            key = "mbps" if w.startswith("128k") else "iops"
            best = max(f[key] for f in fios)
            ratio = f'{pool[key] / best:.2f}x'
        print(f"{w:32} " + " ".join(f"{c:38}" for c in cells) + f" {ratio}")
    first = by.get(("128k write qd8, new clusters", "io-engine pool"))
    over = by.get(("128k write qd8", "io-engine pool"))
    if first and over:
        print(f'first writes to new clusters: {first["mbps"]:.0f} MB/s against {over["mbps"]:.0f} MB/s '
              f'overwriting ({first["mbps"] / over["mbps"]:.2f}x); fio\'s figure on that row is the same writes '
              f'with an fdatasync every 4 MiB')
    # The aims of the pool-speed issue, against this run's own fio and round trip.
    aims = []
    def best(w, key):
        v = [by[(w, t)][key] for t in ("fio libaio", "fio io_uring") if (w, t) in by]
        return (max(v) if key != "p50" else min(v)) if v else None
    for w in ("4k randread qd32", "4k randwrite qd32"):
        pool, f = by.get((w, "io-engine pool")), best(w, "iops")
        if pool and f:
            aims.append((f"{w} >= 0.8x fio", pool["iops"] / f >= 0.8, f'{pool["iops"] / f:.2f}x'))
            aims.append((f"{w} p99 <= 3x p50", pool["p99"] <= 3 * pool["p50"],
                         f'{pool["p99"] / pool["p50"]:.1f}x'))
    for w in ("4k randread qd1", "4k randwrite qd1"):
        pool, f = by.get((w, "io-engine pool")), best(w, "p50")
        if pool and f and rtt:
            aims.append((f"{w} p50 <= fio's + 1.3 x round trip ({f:.0f} + 1.3 x {rtt:.0f} us)",
                         pool["p50"] <= f + 1.3 * rtt, f'{pool["p50"]:.0f} us'))
    for w in ("128k read qd8", "128k write qd8"):
        pool, f = by.get((w, "io-engine pool")), best(w, "mbps")
        if pool and f:
            aims.append((f"{w} >= 0.9x fio", pool["mbps"] / f >= 0.9, f'{pool["mbps"] / f:.2f}x'))
    if first and over:
        aims.append(("first writes >= 0.5x overwrites", first["mbps"] >= 0.5 * over["mbps"],
                     f'{first["mbps"] / over["mbps"]:.2f}x'))
    for name, met, value in aims:
        print(f'aim {name:66} {value:>8} {"met" if met else "NOT met"}')
    # fio's submission and completion times, to set beside the engine's disk_submit and disk_kernel stages (below):
    # what the engine adds around the same disk I/O.
    split = [(w, r) for (w, t), r in by.items() if t == "fio io_uring" and w.startswith("4k") and "slat" in r]
    if split:
        print("fio io_uring's submission / completion (mean us; beside disk_submit / disk_kernel below): " + "; ".join(
            f'{w} {r["slat"]:.1f} / {r["clat"]:.1f}' for w, r in split))
    # How busy the engine was: near one core at QD32, its thread (one connection, one I/O thread) is the limit,
    # not the disk.
    cpu = [(w, r) for (w, t), r in by.items() if t == "io-engine pool" and r.get("cpu_s") and r.get("secs")]
    if cpu:
        print("engine CPU (an I/O thread's spin included): " + "; ".join(
            f'{w} {r["cpu_s"] / r["secs"]:.2f} cores, {r["cpu_s"] * 1e6 / (r["iops"] * r["secs"]):.1f} us/IO'
            for w, r in cpu if w.startswith("4k")))
noisy = [r for r in rows if r.get("steal", 0) > NOISY]
print(f"\n* the hypervisor took more than {NOISY:.0%} of the machine during that run ({len(noisy)} of {len(rows)} runs):"
      " its figures are not the software's")
EOF
echo
echo "### where the engine's 4 KiB I/Os spent their time (mean us per stage; disk_* for the pool's disk I/O)"
cat "$STAGES"
