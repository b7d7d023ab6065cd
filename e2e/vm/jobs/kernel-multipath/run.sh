#!/bin/bash
# Guest side of the multipath test: two io-engine ports serving one subsystem must appear as ONE namespace with TWO
# controllers; when the host makes port 1's ANA group inaccessible while verified fio runs, I/O moves to port 2 and
# fio sees no error. Parameters come from ./params (TARGET, PORT, PORT2, NQN). Lines starting "@@HOST " ask the host
# test to act; the guest then waits for the kernel to see the result.
set -u
. ./params
ok() { echo "OK: $*"; }
fail() { echo "FAIL: $*"; dmesg | tail -20; exit 1; }
step() { echo "### $*"; }
DEV=/dev/nvme0n1
ana() { cat /sys/block/nvme0c$1n1/ana_state 2>/dev/null; }
ios() { awk '{print $1 + $5}' /sys/block/nvme0c$1n1/stat; }
wait_ana() { for i in $(seq 1 150); do [ "$(ana $1)" = "$2" ] && return 0; sleep 0.1; done; return 1; }

step "connect two paths"
nvme connect -t tcp -a "$TARGET" -s "$PORT" -n "$NQN" || fail "connect port $PORT"
nvme connect -t tcp -a "$TARGET" -s "$PORT2" -n "$NQN" || fail "connect port $PORT2"
for i in $(seq 1 100); do [ -b $DEV ] && [ -e /sys/block/nvme0c1n1 ] && break; sleep 0.1; done
nvme list-subsys
nblk=$(ls /sys/block | grep -c '^nvme.n')
nctrl=$(ls /sys/class/nvme-subsystem/nvme-subsys0/ | grep -cE "^nvme[0-9]+$")
echo "namespace block devices: $nblk, controllers: $nctrl"
[ "$nblk" = 1 ] && [ "$nctrl" = 2 ] || fail "expected one namespace with two controllers"
ok "one multipath namespace, two controllers"
echo "path states: c0=$(ana 0) c1=$(ana 1)"
[ "$(ana 0)" = optimized ] && [ "$(ana 1)" = optimized ] || fail "paths not optimized"

step "verified fio while port 1 becomes inaccessible"
fio --name=mp --filename=$DEV --rw=randrw --bs=4k --size=16M --direct=1 --ioengine=libaio --iodepth=16 \
    --verify=crc32c --verify_backlog=64 --verify_fatal=1 --time_based --runtime=${FIO_SECONDS:-12} \
    --output=/tmp/fio-mp.out > /dev/null 2>&1 &
pid=$!
sleep 3
echo "I/Os before the change: c0=$(ios 0) c1=$(ios 1)"
echo "@@HOST ana-inaccessible"
wait_ana 0 inaccessible || fail "kernel never saw port 1 inaccessible (c0=$(ana 0))"
ok "kernel sees path c0 inaccessible, c1=$(ana 1)"
sleep 0.5
before0=$(ios 0); before1=$(ios 1)
sleep 3
after0=$(ios 0); after1=$(ios 1)
echo "I/Os on c0: $before0 -> $after0, on c1: $before1 -> $after1"
wait $pid; rc=$?
grep -E "err=|IOPS" /tmp/fio-mp.out | head -3
[ $rc = 0 ] && grep -q "err= 0" /tmp/fio-mp.out || { cat /tmp/fio-mp.out; fail "fio failed across the ANA change"; }
[ $((after1 - before1)) -gt 0 ] || fail "no I/O moved to path c1"
[ $((after0 - before0)) -lt 64 ] || fail "I/O kept flowing on the inaccessible path"
ok "I/O moved to port 2 with no fio error"

step "port 1 optimized again"
echo "@@HOST ana-optimized"
wait_ana 0 optimized || fail "kernel never saw port 1 optimized again"
ok "path c0 optimized again"

nvme disconnect -n "$NQN" || fail "disconnect"
ok "disconnected"
echo "ALL-OK"
