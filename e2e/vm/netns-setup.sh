#!/bin/bash
# netns-setup.sh - private network namespace with a persistent tap device for
# the vm-harness guest (NET=tap in run-vm.sh).
#   netns  $NETNS (default vmlab), lo up
#   tap    $TAP   (default vmtap0) = $HOST_IP (default 10.200.0.1/24)
# The guest gets 10.200.0.2/24 on the other end.  Everything stays inside the
# namespace: run the target/listener there with  ip netns exec $NETNS CMD.
# Usage: netns-setup.sh [up|down]
set -euo pipefail
NETNS=${NETNS:-keelson-vm}
TAP=${TAP:-kvtap0}
HOST_IP=${HOST_IP:-10.200.0.1/24}
case ${1:-up} in
up)
    ip netns list | grep -qw "^$NETNS" || ip netns add "$NETNS"
    ip -n "$NETNS" link set lo up
    if ! ip -n "$NETNS" link show "$TAP" >/dev/null 2>&1; then
        ip -n "$NETNS" tuntap add dev "$TAP" mode tap
        ip -n "$NETNS" addr add "$HOST_IP" dev "$TAP"
    fi
    ip -n "$NETNS" link set "$TAP" up
    ip -n "$NETNS" -br addr
    ;;
down)
    ip netns del "$NETNS" 2>/dev/null || true
    ;;
*) echo "usage: $0 [up|down]" >&2; exit 2 ;;
esac
