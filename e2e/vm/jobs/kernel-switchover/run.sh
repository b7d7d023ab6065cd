#!/bin/bash
# Guest side of the HA switch-over test: the guest is the application node. Its node agent (./node-agent, with the
# libraries it needs next to it) watches the kernel's NVMe paths; the kernel connects to the volume's nexus and
# verified fio writes while the host kills -9 the io-engine hosting that nexus. The node agent reports the broken
# path, the cluster agent moves the nexus, the node agent connects the new path and removes the dead one; fio must
# finish without an error. Parameters in ./params: TARGET, PORT, NQN, HOSTNQN, HOSTID, AGENT, FIO_SECONDS.
set -u
. ./params
ok() { echo "OK: $*"; }
fail() { echo "FAIL: $*"; dmesg | tail -30; echo "--- node agent:"; cat /tmp/node-agent.log; exit 1; }
step() { echo "### $*"; }
DEV=/dev/nvme0n1
metrics() { busybox wget -qO- http://127.0.0.1:9501/metrics 2>/dev/null | grep -E "^keelson_node_(path_state|switchover)" | grep -v " 0$"; }

step "node agent"
chmod +x ./node-agent
LD_LIBRARY_PATH=/job RUST_LOG=info ./node-agent --cluster-agent "$AGENT" --node-name app-1 \
    --metrics 127.0.0.1:9501 > /tmp/node-agent.log 2>&1 &
for i in $(seq 1 50); do metrics > /dev/null && break; busybox wget -qO- http://127.0.0.1:9501/metrics > /dev/null 2>&1 && break; sleep 0.2; done
busybox wget -qO- http://127.0.0.1:9501/metrics > /dev/null 2>&1 || fail "node agent not serving metrics"
ok "node agent running"

step "connect the volume"
nvme connect -t tcp -a "$TARGET" -s "$PORT" -n "$NQN" --hostnqn="$HOSTNQN" --hostid="$HOSTID" \
    --ctrl-loss-tmo=-1 --keep-alive-tmo=5 --reconnect-delay=1 || fail "nvme connect"
for i in $(seq 1 100); do [ -b $DEV ] && break; sleep 0.1; done
[ -b $DEV ] || fail "no $DEV"
sleep 0.5
metrics
ok "connected to the volume's nexus at $TARGET:$PORT"

step "verified fio while the nexus's io-engine is killed"
fio --name=ho --filename=$DEV --rw=randwrite --bs=4k --size=32M --direct=1 --ioengine=libaio --iodepth=16 \
    --verify=crc32c --verify_backlog=128 --verify_fatal=1 --time_based --runtime=${FIO_SECONDS:-20} \
    --write_lat_log=/tmp/ho --log_avg_msec=0 --output=/tmp/fio.out > /dev/null 2>&1 &
pid=$!
sleep 4
echo "@@HOST kill-nexus"
wait $pid; rc=$?
grep -E "err=|IOPS|clat \(|lat \(" /tmp/fio.out | head -6
[ $rc = 0 ] && grep -q "err= 0" /tmp/fio.out || { cat /tmp/fio.out; fail "fio saw errors across the switch-over"; }
max=$(awk -F, '{ if ($2 > m) m = $2 } END { printf "%d", m / 1000000 }' /tmp/ho_lat.1.log 2>/dev/null)
echo "STALL-MS ${max:-unknown}"
ok "no fio error across the switch-over"

step "paths and metrics after it"
cat /sys/class/nvme-subsystem/nvme-subsys0/nvme*/address 2>/dev/null
for c in /sys/class/nvme-subsystem/nvme-subsys0/nvme[0-9]*; do echo "$(basename $c) $(cat $c/state) $(cat $c/address)"; done
metrics
metrics | grep -q 'keelson_node_switchovers_total{result="ok"} 1' || fail "metrics do not show one switch-over"
metrics | grep -q 'state="removed"' || fail "metrics do not show the dead path removed"
grep -E "broken path|switched over|dead path removed|new path connected" /tmp/node-agent.log | sed 's/^/node-agent: /'
[ "$(ls -d /sys/class/nvme-subsystem/nvme-subsys0/nvme[0-9]* | wc -l)" = 1 ] || fail "the dead controller is still there"

nvme disconnect -n "$NQN" > /dev/null || fail "disconnect"
echo "ALL-OK"
