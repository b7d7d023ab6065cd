#!/bin/bash
# Guest side of the HA switch-over test: the guest is the application node. Its node agent (./node-agent, with the
# libraries it needs next to it) watches the kernel's NVMe paths; the kernel connects to the volume's nexus and
# verified fio writes while the host makes the nexus fail (each word of FAILURES is one round: "kill" = kill -9 of
# the io-engine hosting the nexus, "stop" = SIGSTOP of it, a node gone silent, "cut" = the guest cut off from it
# while it still reaches its replicas, "drain" = a planned move off its node, "crash" = kill -9 with the cluster
# agent dying mid switch-over, "partition" = its node cut off from the guest and the cluster agent, after which
# another host writes through the old nexus at 56 MiB and the guest checks none of it landed). The node agent reports the broken
# path, the cluster agent moves the nexus, the node agent connects the new path and removes the dead one; fio must
# finish every round without an error. Each round prints "STALL-MS <mode> <longest write latency>" and the node
# agent's switch-over duration. Parameters in ./params: TARGET, PORT, NQN, HOSTNQN, HOSTID, AGENT, FIO_SECONDS,
# FAILURES, KATO (keep-alive timeout of the paths, seconds), ACK_HOST and ACK_PORT (the host opens it when a round's failed engine is back).
set -u
. ./params
ok() { echo "OK: $*"; }
fail() { echo "FAIL: $*"; dmesg | tail -30; echo "--- node agent:"; tail -40 /tmp/node-agent.log; exit 1; }
step() { echo "### $*"; }
DEV=/dev/nvme0n1
SUB=/sys/class/nvme-subsystem/nvme-subsys0
metrics() { busybox wget -qO- http://127.0.0.1:9501/metrics 2>/dev/null; }
controllers() { for c in $SUB/nvme*; do [[ $(basename $c) =~ ^nvme[0-9]+$ ]] && echo $c; done; }
paths() { for c in $(controllers); do echo "  $(basename $c) $(cat $c/state) $(cat $c/address)"; done; }
ctrls() { controllers | wc -l; }
switchovers() { metrics | awk '/^keelson_node_switchovers_total\{result="ok"\}/ {print $2}'; }

step "node agent"
chmod +x ./node-agent
LD_LIBRARY_PATH=/job RUST_LOG=info ./node-agent --cluster-agent "$AGENT" --node-name app-1 \
    --metrics 127.0.0.1:9501 --keep-alive-tmo "$KATO" > /tmp/node-agent.log 2>&1 &
for i in $(seq 1 50); do metrics > /dev/null && break; sleep 0.2; done
metrics > /dev/null || fail "node agent not serving metrics"
ok "node agent running"

step "connect the volume"
nvme connect -t tcp -a "$TARGET" -s "$PORT" -n "$NQN" --hostnqn="$HOSTNQN" --hostid="$HOSTID" \
    --ctrl-loss-tmo=-1 --keep-alive-tmo="$KATO" --reconnect-delay=1 || fail "nvme connect"
for i in $(seq 1 100); do [ -b $DEV ] && break; sleep 0.1; done
[ -b $DEV ] || fail "no $DEV"
sleep 0.5
paths
ok "connected to the volume's nexus at $TARGET:$PORT"

round=0
for mode in $FAILURES; do
    round=$((round + 1))
    step "round $round: verified fio while the nexus fails ($mode)"
    before=$(switchovers)
    old=$(cat $(controllers | head -1)/address)
    rm -f /tmp/ho_lat.*.log
    # Two verified writers at once: 4 KiB in the first 24 MiB, 128 KiB in the next 24 MiB (the volume's last
    # 16 MiB stay unwritten: a partition round checks that the old nexus's late writes never land there).
    # SIGPIPE ignored in fio: twice in many drain rounds a fio worker died of SIGPIPE (no I/O error, err= 0), which
    # no block I/O raises; ignored, whatever fio was writing fails with EPIPE and fio.out says what it was.
    trap '' PIPE
    fio --filename=$DEV --rw=randwrite --direct=1 --ioengine=libaio --iodepth=16 \
        --verify=crc32c --verify_backlog=128 --verify_fatal=1 --time_based --runtime=$FIO_SECONDS \
        --write_lat_log=/tmp/ho --log_avg_msec=0 --output=/tmp/fio.out \
        --name=ho4k --bs=4k --offset=0 --size=24M --name=ho128k --bs=128k --offset=24M --size=24M > /dev/null 2>&1 &
    pid=$!
    trap - PIPE
    sleep 4
    echo "@@HOST fail-nexus $mode"
    wait $pid; rc=$?
    grep -E "err=|write: IOPS" /tmp/fio.out
    [ $rc = 0 ] && [ "$(grep -c "err= 0" /tmp/fio.out)" = 2 ] || { cat /tmp/fio.out; fail "fio saw errors across the switch-over"; }
    max=$(cat /tmp/ho_lat.*.log | awk -F, '{ if ($2 + 0 > m) m = $2 + 0 } END { printf "%d", m / 1000000 }')
    # The node agent's stages: failure seen -> reported (detect), the cluster agent's answer, connect, live; took.
    stages=$(grep "switched over" /tmp/node-agent.log | tail -1 | grep -oE "(report|switchover|connect|live|took)_ms=[0-9]*" | tr '\n' ' ')
    echo "STALL-MS $mode $max $stages"
    [ "$(switchovers)" -gt "${before:-0}" ] || fail "no switch-over counted"
    # A silent target (frozen, cut off) is seen before the kernel's keep-alive notices: its path showed stalled.
    if [ "$mode" = stop ] || [ "$mode" = cut ] || [ "$mode" = partition ]; then
        metrics | grep -q "^keelson_node_path_state{address=\"$(echo "$old" | sed 's/^traddr=\([^,]*\),trsvcid=\([0-9]*\).*/\1:\2/')\".*state=\"stalled\"" \
            || { metrics | grep keelson_node_path_state; fail "the silent path was never shown stalled"; }
    fi
    for i in $(seq 1 50); do [ "$(ctrls)" = 1 ] && break; sleep 0.1; done
    paths
    [ "$(ctrls)" = 1 ] || fail "the dead controller is still there"
    ok "round $round: no fio error, one live path"
    echo "@@HOST restore"
    for i in $(seq 1 900); do (echo > /dev/tcp/$ACK_HOST/$ACK_PORT) 2>/dev/null && break; sleep 0.2; done
    if [ "$mode" = partition ]; then
        # Another host wrote through the old nexus at 56 MiB after the switch-over; none of it may be there.
        dd if=$DEV of=/tmp/fenced bs=1M skip=56 count=1 iflag=direct 2> /dev/null || fail "reading the volume"
        head -c 1048576 /dev/zero > /tmp/zero
        cmp -s /tmp/fenced /tmp/zero || fail "a write through the fenced old nexus reached the volume"
        ok "round $round: nothing written through the fenced old nexus reached the volume"
    fi
done

step "metrics"
metrics | grep -E "^keelson_node_(path_state|switchover)" | grep -v " 0$"
metrics | grep -q 'state="removed"' || fail "metrics do not show a dead path removed"
metrics | grep -q '^keelson_node_registered 1' || fail "the node agent is not registered with the cluster agent"
grep -E "broken path|switched over|dead path removed|new path connected" /tmp/node-agent.log | sed 's/^.*Z //' | head -20
nvme disconnect -n "$NQN" > /dev/null || fail "disconnect"
echo "ALL-OK"
