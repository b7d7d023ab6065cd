#!/usr/bin/env bash
# Two builds of the engine against each other on a pool replica, in alternating rounds: on a virtual machine whose
# disk and wake-up costs drift several-fold within an hour, only runs taken in turn in the same minutes can tell a
# change from the drift. One pool on a file, a 2 GiB replica on it whose every cluster was written first (made once,
# then served by each build in turn: both must read the same pool format), nvmf-perf over loopback. Rounds run
# A B B A A B ... so a drift within a round weighs on both alike. Prints, per workload, each build's median IOPS,
# p50 latency and engine CPU per I/O (an I/O thread's spin included) with the rounds' range, and B's median against
# A's.
#
# Usage: scripts/bench-ab.sh DIR_A DIR_B [ROUNDS, default 4] [SECONDS per run, default 3]
#   DIR_A, DIR_B  directories with io-engine, nvmf-perf and keelctl, e.g. made by
#                 `scripts/prepare-device-bench.sh main HEAD` (.bench/main, .bench/HEAD)
#   WORKLOADS     "RW:QD ..." (default "randread:1 randwrite:1 randread:4 randread:32 randwrite:32"), 4 KiB each
#   BENCH_DIR     directory for the pool file (default /var/tmp/keelson-bench-ab; not tmpfs: O_DIRECT)
# The engines get the environment as it is (e.g. KEELSON_SPIN_US=0 measures without the spin).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { sed -n '2,15p' "$0"; exit 2; }
A_DIR=$1
B_DIR=$2
ROUNDS=${3:-4}
T=${4:-3}
for d in "$A_DIR" "$B_DIR"; do
    for b in io-engine nvmf-perf keelctl; do
        [ -x "$d/$b" ] || { echo "$d/$b: not an executable"; exit 2; }
    done
done
WORKLOADS=${WORKLOADS:-randread:1 randwrite:1 randread:4 randread:32 randwrite:32}
DIR=${BENCH_DIR:-/var/tmp/keelson-bench-ab}
rm -rf "$DIR"
mkdir -p "$DIR"
RES=$DIR/results.jsonl
: > "$RES"
ADDR=127.0.0.1:4420
API=http://127.0.0.1:10124
R=00000000-0000-4000-8000-00000000ab01
NQN=nqn.2026-11.io.keelson:replica-$R
EPID=""
cleanup() {
    [ -n "$EPID" ] && { kill "$EPID" 2>/dev/null; wait "$EPID" 2>/dev/null || true; }
    rm -f "$DIR/pool.img"
}
trap cleanup EXIT

# start BIN_DIR: an engine on the pool, ready for commands
start() {
    "$1/io-engine" --node-name bench-ab --listen $ADDR --grpc 127.0.0.1:10124 --metrics 127.0.0.1:9126 \
        --pool "pool0=$DIR/pool.img" > "$DIR/engine.log" 2>&1 &
    EPID=$!
    for _ in $(seq 1 100); do "$1/keelctl" engine --endpoint $API pool list > /dev/null 2>&1 && return; sleep 0.1; done
    echo "the engine in $1 did not start: $DIR/engine.log"
    exit 1
}
stop() {
    kill "$EPID"
    wait "$EPID" 2>/dev/null || true
    EPID=""
}

truncate -s 5G "$DIR/pool.img"
start "$A_DIR"
"$A_DIR/keelctl" engine --endpoint $API replica create pool0 $R 2GiB --share > /dev/null
echo "filling the replica (every cluster allocated)"
"$A_DIR/nvmf-perf" --addr $ADDR --nqn "$NQN" --rw write --bs 128k --qd 8 --time 25 > /dev/null
stop

# run LABEL BIN_DIR: every workload once on a fresh engine of that build
run() {
    start "$2"
    for w in $WORKLOADS; do
        "$2/nvmf-perf" --addr $ADDR --nqn "$NQN" --rw "${w%:*}" --bs 4k --qd "${w#*:}" --time "$T" --json \
            --target-pid "$EPID" |
            python3 -c '
import json, sys
d = json.load(sys.stdin)
if d["errors"]:
    sys.exit(sys.argv[2] + ": I/O errors: " + str(d["errors"]))
print(json.dumps(dict(build=sys.argv[1], workload=sys.argv[2], iops=d["iops"], p50=d["lat_us"]["p50"],
                      cpu_us=d["target_cpu_s"] * 1e6 / max(d["iops"] * d["seconds"], 1))))
' "$1" "$w" >> "$RES"
    done
    stop
}

for i in $(seq 1 "$ROUNDS"); do
    if [ $((i % 2)) -eq 1 ]; then order="A B"; else order="B A"; fi
    for x in $order; do
        echo "round $i: $x"
        if [ "$x" = A ]; then run A "$A_DIR"; else run B "$B_DIR"; fi
    done
done

python3 - "$RES" "$A_DIR" "$B_DIR" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"\nA = {sys.argv[2]}, B = {sys.argv[3]}; medians over {len(rows) // 2 // len({r['workload'] for r in rows})} "
      "rounds each, [min-max]")
print(f'{"workload":16} {"build":5} {"IOPS":>24} {"p50 us":>18} {"CPU us/IO":>20}')
for w in dict.fromkeys(r["workload"] for r in rows):
    med = {}
    for b in ("A", "B"):
        rs = [r for r in rows if r["workload"] == w and r["build"] == b]
        cell = lambda k, f: (f"{f(statistics.median(r[k] for r in rs))} "
                             f"[{f(min(r[k] for r in rs))}-{f(max(r[k] for r in rs))}]")
        med[b] = {k: statistics.median(r[k] for r in rs) for k in ("iops", "p50", "cpu_us")}
        print(f'{w.replace(":", " qd"):16} {b:5} {cell("iops", lambda v: f"{v / 1000:.1f}k"):>24} '
              f'{cell("p50", lambda v: f"{v:.0f}"):>18} {cell("cpu_us", lambda v: f"{v:.1f}"):>20}')
    a, b = med["A"], med["B"]
    print(f'{"":16} {"B/A":5} {b["iops"] / a["iops"]:>23.2f}x {b["p50"] / a["p50"]:>17.2f}x '
          f'{b["cpu_us"] / a["cpu_us"]:>19.2f}x')
EOF
