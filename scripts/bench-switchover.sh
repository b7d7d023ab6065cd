#!/usr/bin/env bash
# HA switch-over stall, measured with the Linux kernel as the host (QEMU VM; needs root and QEMU, like the e2e
# tests): verified fio in the guest on a 3-replica volume while the host kills -9 the io-engine hosting the nexus
# (ROUNDS times), then SIGSTOPs it, cuts the guest off from it, drains its node, and partitions it from the guest and
# the cluster agent (3 times each); the node agent in the guest reports, the cluster agent moves the nexus, the
# node agent connects the new path. Prints, per failure kind, the longest write latency fio saw in each round (the
# stall) as p50 / p99 / max, the node agent's own failure-seen-to-new-path-live time, and the cluster agent's time
# per stage of the switch-overs (end the old nexus, disown the failed node's replicas, publish the new one).
# Usage: scripts/bench-switchover.sh [ROUNDS, default 10] [KATO seconds, default 2: the paths' keep-alive timeout,
# which bounds how soon the kernel notices a stopped node]. Latencies are under QEMU's emulation.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-10}
KATO=${2:-2}
cargo build -q --workspace --bins
failures=""
for _ in $(seq 1 "$N"); do failures="$failures kill"; done
for _ in $(seq 1 "$((N < 3 ? N : 3))"); do failures="$failures stop cut drain partition"; done
out=$(mktemp)
KEELSON_SWITCHOVER_FAILURES="$failures" KEELSON_SWITCHOVER_KATO="$KATO" KEELSON_REQUIRE_PRIVILEGED=1 cargo test -q -p e2e --test kernel_switchover \
    -- --nocapture 2>&1 | tee "$out" | grep -E "STALL-MS|^test |FAIL" || true
pct() { # p (0-100) of the numbers on stdin
    sort -n | awk -v p="$1" '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit } i = int(NR * p / 100 + 0.999); if (i < 1) i = 1; if (i > NR) i = NR; print v[i] }'
}
for mode in kill stop cut drain partition; do
    stalls=$(grep -o "STALL-MS $mode [0-9]*" "$out" | awk '{print $3}')
    [ -n "$stalls" ] || continue
    echo "$mode, keep-alive ${KATO} s ($(echo "$stalls" | wc -l) rounds): fio stall p50 $(echo "$stalls" | pct 50) ms, p99 $(echo "$stalls" | pct 99) ms," \
        "max $(echo "$stalls" | pct 100) ms"
    # The node agent's stages: detect (failure seen to reported), the cluster agent's switch-over as the node agent
    # waits for it, connect, live (the kernel's scan of the new path), took (seen to new path live).
    for stage in report switchover connect live took; do
        v=$(grep "^STALL-MS $mode " "$out" | grep -o "${stage}_ms=[0-9]*" | sed 's/.*=//')
        [ -n "$v" ] || continue
        printf '  node agent %-10s p50 %s ms, max %s ms\n' "$stage" "$(echo "$v" | pct 50)" "$(echo "$v" | pct 100)"
    done
done
# The cluster agent's own stages of every switch-over in the run (its "switched over" log lines): ending the old
# nexus, disowning the failed node's replicas, publishing the new nexus, and report-to-published; publishing in
# parts: place (node chosen, recorded), share (replicas opened to it), create (made, its key taken on every replica
# with the old one preempted: the fencing), export.
for stage in end_old disown publish place share create export took; do
    v=$( (grep "^agent: .*switched over" "$out"; grep "^agent: .*volume published" "$out" | grep -v 'moved_from=""') |
        grep -o "${stage}_ms=[0-9]*" | sed 's/.*=//')
    [ -n "$v" ] || continue
    printf 'cluster agent %-8s over %d switch-overs: p50 %s ms, max %s ms\n' "$stage" "$(echo "$v" | wc -l)" \
        "$(echo "$v" | pct 50)" "$(echo "$v" | pct 100)"
done
if grep -q "FAILED" "$out"; then
    cp "$out" "${TMPDIR:-/tmp}/bench-switchover-failed.log"
    echo "the run failed: its whole output is in ${TMPDIR:-/tmp}/bench-switchover-failed.log"
fi
rm -f "$out"
