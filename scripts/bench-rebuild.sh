#!/usr/bin/env bash
# Rebuild figures on pool-backed replicas: two io-engines on 127.0.0.1 and 127.0.0.2, each with a pool on a sparse
# file under $BENCH_DIR (default /var/tmp), a nexus on 127.0.0.1 over a local replica filled with data, and full
# rebuilds into fresh remote replicas. The baseline is what the backing store itself can copy: fio reading the
# source pool file and writing a fresh file at the same time, 1 MiB direct I/O, 4 deep (4 MiB in flight each way).
# Then the same rebuild while the application writes, and the application's throughput with and without it; and,
# for reference, the store copy while the application writes, with no rebuild, unthrottled and held to 80 % of its
# idle rate (the aim's operating point on the store itself). The loaded measurements alternate over 3 rounds.
# Usage: scripts/bench-rebuild.sh [volume size, default 1GiB]
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-1GiB}
command -v fio >/dev/null || { echo "fio is needed (scripts/install-deps.sh installs it)" >&2; exit 1; }
cargo build --release --bins -q
B=$PWD/target/release
D=$(mktemp -d "${BENCH_DIR:-/var/tmp}/keelson-bench.XXXXXX")
PIDS=()
trap 'kill ${PIDS[@]} 2>/dev/null || true; sleep 0.5; rm -rf "$D"' EXIT
for i in 1 2; do
    truncate -s 16G "$D/pool$i.img"
    $B/io-engine --node-name n$i --listen 127.0.0.$i:4420 --grpc 127.0.0.$i:10124 > "$D/e$i.log" 2>&1 &
    PIDS+=($!)
done
sleep 1
k() { local i=$1; shift; $B/keelctl engine --endpoint http://127.0.0.$i:10124 "$@"; }
for i in 1 2; do k $i pool create p$i "$D/pool$i.img" >/dev/null; done
U=00000000-0000-4000-8000-0000000000
R=nqn.2026-11.io.keelson:replica-
NX=00000000-0000-4000-8000-00000000b001
VOL=nqn.2026-11.io.keelson:vol-$NX
k 1 replica create p1 "${U}a0" "$SIZE" --share >/dev/null
k 1 create-nexus $NX "local:///${R}${U}a0" >/dev/null
k 1 publish-nexus $NX --allow-any-host >/dev/null
$B/nvmf-perf --addr 127.0.0.1:4420 --nqn "$VOL" --rw write --bs 1m --qd 4 --time 3 >/dev/null # fill it

rebuilds() { k 1 nexuses | awk -v u=$NX '$1=="nexus"{cur=$2} cur==u && $1=="rebuild"'; }
wait_rebuilds() { # count
    for _ in $(seq 1 3000); do
        [ "$(rebuilds | wc -l)" -ge "$1" ] && return 0
        sleep 0.1
    done
    echo "rebuild did not finish" >&2; return 1
}
ms_of() { sed -n 's/.*ms=\([0-9]*\).*/\1/p'; }
n=0
dest=0
# Adds a fresh replica on engine 2 and waits for its full rebuild; sets LAST_MS to its duration.
rebuild_fresh() {
    dest=$((dest + 1))
    local u; u=$(printf '%sb%d' "$U" $dest)
    k 2 replica create p2 "$u" "$SIZE" --share >/dev/null
    k 1 add-child $NX "nvmf://127.0.0.2:4420/${R}$u" >/dev/null
    n=$((n + 1))
    wait_rebuilds $n
    LAST_MS=$(rebuilds | tail -1 | ms_of)
}
retire() { # the last destination leaves the nexus and its pool
    local u; u=$(printf '%sb%d' "$U" $dest)
    k 1 remove-child $NX "nvmf://127.0.0.2:4420/${R}$u" >/dev/null
    k 2 replica destroy "$u" >/dev/null
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
mbs() { awk -v s="$1" -v ms="$2" 'BEGIN {printf "%.0f", s / 1e6 / (ms / 1000)}'; }
size_b=$(numfmt --from=iec-i --suffix=B "$SIZE" | tr -d B)

echo "## what the store can copy ($SIZE, fio: read the source pool file while writing a fresh file, 1 MiB, QD4, O_DIRECT)"
cat > "$D/copy.fio" <<EOF
[global]
direct=1
ioengine=libaio
bs=1M
iodepth=4
size=$size_b
[read]
filename=$D/pool1.img
rw=read
[write]
filename=$D/copy.img
rw=write
EOF
# The machine's disk throughput drifts from minute to minute: store copies and rebuilds alternate, 5 of each.
store=()
idle=()
for r in 1 2 3 4 5; do
    rm -f "$D/copy.img"
    # Both jobs run at once; the copy is done when the slower one is.
    store+=("$(fio "$D/copy.fio" --output-format=terse | awk -F';' '{r = $9 > $50 ? $9 : $50; if (r > m) m = r} END {print m}')")
    rm -f "$D/copy.img"
    rebuild_fresh
    idle+=("$LAST_MS")
    retire
done
store_ms=$(printf '%s\n' "${store[@]}" | median)
idle_ms=$(printf '%s\n' "${idle[@]}" | median)
echo "store copy: ${store[*]} ms, median $store_ms ms = $(mbs "$size_b" "$store_ms") MB/s"
echo "## full rebuild into a fresh thin replica, no application I/O (alternating with the store copies above)"
echo "rebuild: ${idle[*]} ms, median $idle_ms ms = $(mbs "$size_b" "$idle_ms") MB/s," \
    "$(awk -v a="$store_ms" -v b="$idle_ms" 'BEGIN {printf "%.0f", 100 * a / b}') % of the store copy"

echo "## under application load (4 KiB random writes, QD32, 2 s after 1 s warm-up), 3 alternating rounds of:"
echo "#  the app alone on a 2-replica volume; a rebuild of its second replica while it runs; the store copy while"
echo "#  it runs (no rebuild); the store copy held to 80 % of its idle rate (fio rate limit) while it runs."
# Every pool here shares one disk. The store copy under the same load is the trade-off the disk itself makes
# between a copy and the application, the bound for any rebuild on this machine; the copy held to 80 % is the
# aim's operating point on the store itself: if the application keeps less than 70 % there, no rebuild on this
# disk can copy at 80 % of the store's rate while the application keeps 70 %.
app() { $B/nvmf-perf --addr 127.0.0.1:4420 --nqn "$VOL" --rw randwrite --bs 4k --qd 32 --time 2 --json |
    python3 -c 'import json,sys; print(round(json.load(sys.stdin)["iops"]))'; }
# Runs fio's store copy for 4 s (it covers the application's whole 3 s), extra fio arguments in "$@", while the
# application runs; sets SHARED (IOPS) and COPY_MBS (the slower of the copy's read and write, MB/s).
copy_under_app() {
    rm -f "$D/copy.img"
    fio "$D/copy.fio" --time_based --runtime=4 "$@" --output-format=terse > "$D/fio" &
    local fio_pid=$!
    sleep 0.2
    SHARED=$(app)
    wait $fio_pid
    COPY_MBS=$(awk -F';' '{r = $7 > $48 ? $7 : $48; if (m == "" || r < m) m = r} END {printf "%.0f", m * 1024 / 1e6}' "$D/fio")
    rm -f "$D/copy.img"
}
rate=$(awk -v s="$size_b" -v ms="$store_ms" 'BEGIN {printf "%.0f", 0.8 * s / (ms / 1000)}')
alone=() with=() busy_mbs=() shared=() copy=() held=() held_copy=()
rebuild_fresh # a healthy second replica: the baseline is the same 2-replica volume without a rebuild
short=0
for r in 1 2 3; do
    alone+=("$(app)")
    retire
    app > "$D/app" &
    app_pid=$!
    sleep 0.2
    rebuild_fresh
    wait $app_pid
    with+=("$(cat "$D/app")")
    [ "$LAST_MS" -ge 2800 ] || short=1
    busy_mbs+=("$(mbs "$size_b" "$LAST_MS")")
    copy_under_app
    shared+=("$SHARED") copy+=("$COPY_MBS")
    copy_under_app --rate="$rate"
    held+=("$SHARED") held_copy+=("$COPY_MBS")
done
med() { printf '%s\n' "$@" | median; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.0f", 100 * a / b}'; }
alone_m=$(med "${alone[@]}")
echo "app alone: ${alone[*]} IOPS, median $alone_m"
store_mbs=$(mbs "$size_b" "$store_ms")
for row in "rebuilding:with:busy_mbs" "store copying:shared:copy" "store copying at 80 %:held:held_copy"; do
    IFS=: read -r what iops_v mbs_v <<< "$row"
    declare -n iops_a=$iops_v mbs_a=$mbs_v
    i=$(med "${iops_a[@]}") m=$(med "${mbs_a[@]}")
    echo "app while $what: ${iops_a[*]} IOPS, median $i = $(pct "$i" "$alone_m") % of alone;" \
        "copy ${mbs_a[*]} MB/s, median $m = $(pct "$m" "$store_mbs") % of the idle store copy"
done
[ $short = 0 ] || echo "note: a rebuild ended before the application's 3 s window did; use a larger size"
