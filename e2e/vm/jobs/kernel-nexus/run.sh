#!/bin/bash
# Guest side of the replicated-volume test: the kernel writes through a 3-replica nexus while the host kills one
# replica's io-engine and replaces it with a new one that is rebuilt online. Region A (first 32 MiB) is written with
# fio verify headers before the failure, so after the rebuild the new replica holds it only because the rebuild
# copied it; the host then faults the two old replicas and fio verifies region A as read from the new one alone.
# Parameters in ./params: TARGET, PORT, NQN, ACK_PORT. "@@HOST <request>" lines ask the host to act; for the last
# one the host opens ACK_PORT when done.
set -u
. ./params
ok() { echo "OK: $*"; }
fail() { echo "FAIL: $*"; dmesg | tail -20; exit 1; }
step() { echo "### $*"; }
DEV=/dev/nvme0n1
region_a() { fio --name=a --filename=$DEV --rw=write --bs=128k --offset=0 --size=32M --direct=1 --ioengine=libaio \
    --iodepth=8 --verify=crc32c "$@" --output=/tmp/a.out > /dev/null 2>&1; }

nvme connect -t tcp -a "$TARGET" -s "$PORT" -n "$NQN" || fail "nvme connect"
for i in $(seq 1 100); do [ -b $DEV ] && break; sleep 0.1; done
[ -b $DEV ] || fail "no $DEV"
ok "connected to the replicated volume"

step "region A: write 32 MiB with verify headers"
region_a --do_verify=0 || { cat /tmp/a.out; fail "writing region A"; }
ok "region A written"

step "region B: verified random writes while a replica dies and a new one is rebuilt"
fio --name=b --filename=$DEV --rw=randwrite --bs=4k --offset=64M --size=16M --direct=1 --ioengine=libaio \
    --iodepth=16 --verify=crc32c --verify_backlog=128 --verify_fatal=1 --time_based --runtime=${FIO_SECONDS:-30} \
    --output=/tmp/b.out > /dev/null 2>&1 &
pid=$!
sleep 4
echo "@@HOST kill-replica"
sleep 6
echo "@@HOST replace-replica"
wait $pid; rc=$?
grep -E "err=|IOPS" /tmp/b.out | head -3
[ $rc = 0 ] && grep -q "err= 0" /tmp/b.out || { cat /tmp/b.out; fail "fio saw errors across the failure and rebuild"; }
ok "no fio error while a replica died and a new one was rebuilt"

step "read region A from the rebuilt replica alone"
echo "@@HOST isolate-rebuilt"
for i in $(seq 1 600); do (echo > /dev/tcp/$TARGET/$ACK_PORT) 2>/dev/null && break; sleep 0.2; done
(echo > /dev/tcp/$TARGET/$ACK_PORT) 2>/dev/null || fail "host never finished isolating the rebuilt replica"
echo 3 > /proc/sys/vm/drop_caches
region_a --verify_only || { cat /tmp/a.out; fail "region A is wrong on the rebuilt replica"; }
grep -E "err=|READ" /tmp/a.out | head -2
ok "region A verified from the rebuilt replica"

nvme disconnect -n "$NQN" || fail "disconnect"
echo "ALL-OK"
