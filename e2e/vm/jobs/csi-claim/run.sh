#!/bin/bash
# Guest side of a claim's whole life: the guest is Kubernetes node "app-1" with the node plugin. The host made a
# 3-replica volume through the CSI controller and published it here (VOL, NQN, ADDR, HOSTNQN in ./params). Here: stage
# and publish it (ext4), write a file with fio (verified), ask the host for a snapshot and a volume made from it,
# change the file, stage and publish the new volume: it holds the file as it was at the snapshot (fio verifies it,
# checksums match); the host grows the claim while it is mounted, the file system grows online and takes a verified
# fio in the new space; then unpublish and unstage both; the host deletes everything and checks no pool holds anything.
set -u
. ./params
ok() { echo "OK: $*"; }
fail() { echo "FAIL: $*"; dmesg | tail -20; for b in /sys/block/nvme*; do echo "$b uuid=$(cat $b/uuid 2>/dev/null) wwid=$(cat $b/wwid 2>/dev/null)"; done; ls /sys/class/nvme/nvme1/ 2>/dev/null | tr '\n' ' '; nvme list-ns /dev/nvme1 -a 2>&1 | head; nvme id-ns /dev/nvme1 -n 1 2>&1 | head -8; echo "--- node plugin:"; tail -40 /tmp/csi-node.log; exit 1; }
step() { echo "### $*"; }
SOCK=/csi/csi.sock
K() { LD_LIBRARY_PATH=/job ./keelctl csi --endpoint unix://$SOCK "$@"; }
# host REQUEST: asks the host, waits for its answer to it (a line of KEY=VALUE words with DONE=REQUEST, evaluated here).
host() {
    echo "@@HOST $1"
    for i in $(seq 1 600); do
        if exec 3<>/dev/tcp/$ACK_HOST/$ACK_PORT 2>/dev/null; then
            read -r answer <&3; exec 3<&-
            eval "$answer"
            [ "${DONE:-}" = "$1" ] && return
        fi
        sleep 0.2
    done
    fail "host never answered $1"
}

step "node plugin"
chmod +x ./csi-driver ./keelctl
mkdir -p /csi /stage /pods
LD_LIBRARY_PATH=/job RUST_LOG=info ./csi-driver --mode node --node-name app-1 --endpoint unix://$SOCK \
    --cluster-agent "$AGENT" > /tmp/csi-node.log 2>&1 &
for i in $(seq 1 50); do [ -S $SOCK ] && break; sleep 0.2; done

step "stage, publish, verified fio"
K stage $VOL /stage/vol --nqn "$NQN" --addresses "$ADDR" --host-nqn "$HOSTNQN" --fs ext4 > /dev/null || fail "stage"
mkdir -p /pods/app
K publish $VOL /stage/vol /pods/app/data --fs ext4 > /dev/null || fail "publish"
fio --name=claim --filename=/pods/app/data/fio.dat --size=16M --rw=randwrite --bs=4k --ioengine=libaio --direct=1 \
    --iodepth=8 --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/fio.out > /dev/null 2>&1 ||
    { cat /tmp/fio.out; fail "fio"; }
grep -q "err= 0" /tmp/fio.out || { cat /tmp/fio.out; fail "fio errors"; }
echo "snapshot moment" > /pods/app/data/note
sync
sum=$(md5sum < /pods/app/data/fio.dat)
ok "16 MiB written and verified by fio on a 3-replica volume"

step "snapshot, and a volume made from it"
host snapshot-and-restore
[ -n "${RVOL:-}" ] || fail "the host gave no restored volume"
echo "after the snapshot" > /pods/app/data/note
dd if=/dev/urandom of=/pods/app/data/fio.dat bs=4k count=16 conv=notrunc 2>/dev/null
sync
out=$(K stage $RVOL /stage/restored --nqn "$RNQN" --addresses "$RADDR" --host-nqn "$HOSTNQN" --fs ext4 2>&1) ||
    fail "stage the restored volume: $out"
K publish $RVOL /stage/restored /pods/app/restored --fs ext4 > /dev/null || fail "publish the restored volume"
[ "$(cat /pods/app/restored/note)" = "snapshot moment" ] || fail "restored note: $(cat /pods/app/restored/note)"
[ "$(md5sum < /pods/app/restored/fio.dat)" = "$sum" ] || fail "restored data differs from the snapshot's"
[ "$(md5sum < /pods/app/data/fio.dat)" != "$sum" ] || fail "the original did not change"
fio --name=claim --filename=/pods/app/restored/fio.dat --size=16M --rw=randwrite --bs=4k --ioengine=libaio \
    --direct=1 --iodepth=8 --verify=crc32c --verify_only=1 --verify_fatal=1 --output=/tmp/fio2.out > /dev/null 2>&1 ||
    { cat /tmp/fio2.out; fail "fio verify of the restored volume"; }
ok "the restored volume holds the snapshot's moment (fio verifies it, the original moved on)"

step "grow the claim while mounted"
blk=$(basename "$(grep " /stage/vol " /proc/mounts | cut -d' ' -f1)")
before=$(df -P -k /pods/app/data | tail -1 | awk '{print $2}')
sum=$(md5sum < /pods/app/data/fio.dat)
host expand
[ -n "${GROWN:-}" ] || fail "the host gave no new size"
for i in $(seq 1 100); do [ $(( $(cat /sys/block/$blk/size) * 512 )) = "$GROWN" ] && break; sleep 0.1; done
K expand $VOL /pods/app/data --staging /stage/vol --required $GROWN > /dev/null || fail "NodeExpandVolume"
after=$(df -P -k /pods/app/data | tail -1 | awk '{print $2}')
[ $after -gt $(( before + 24 * 1024 )) ] || fail "the file system did not grow: $before -> $after KiB"
[ "$(md5sum < /pods/app/data/fio.dat)" = "$sum" ] || fail "data changed by the growth"
fio --name=grown --filename=/pods/app/data/grown.dat --size=$(( (after - before) / 1024 - 4 ))M --rw=randwrite --bs=4k \
    --ioengine=libaio --direct=1 --iodepth=8 --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/fio3.out \
    > /dev/null 2>&1 || { cat /tmp/fio3.out; fail "fio in the grown space"; }
ok "the claim grew to $GROWN bytes while mounted: file system $before -> $after KiB, data intact, fio verified in the new space"

step "unpublish and unstage both"
for v in "$VOL:vol:data" "$RVOL:restored:restored"; do
    IFS=: read -r id st tgt <<< "$v"
    K unpublish $id /pods/app/$tgt > /dev/null || fail "unpublish $id"
    K unstage $id /stage/$st > /dev/null || fail "unstage $id"
done
ok "both unpublished and unstaged"
echo "ALL-OK"
