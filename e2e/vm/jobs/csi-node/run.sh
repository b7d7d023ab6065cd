#!/bin/bash
# Guest side of the CSI node test: the guest is the Kubernetes node "app-1". The node plugin (./csi-driver --mode
# node) runs here, next to the kernel; ./keelctl csi calls it as the kubelet would. The host created the volumes and
# published them to this node through the CSI controller; ./params has each one's publish context (NQN_x, ADDR_x,
# and HOSTNQN) for VOL_EXT4, VOL_XFS and VOL_BLOCK. Checks: stage (mkfs only on a blank device) -> publish -> files
# -> online expansion (the host grows the volume through the controller: the kernel sees the new size from the
# target's notice alone, NodeExpandVolume grows the mounted file system, data intact) -> unpublish -> unstage -> stage
# again -> files intact, for ext4 and xfs; a raw block volume, grown too; stats; the spec's answers to repeated and
# conflicting calls; unstage after the volume's target is gone does not hang.
set -u
. ./params
ok() { echo "OK: $*"; }
fail() { echo "FAIL: $*"; dmesg | tail -20; echo "--- node plugin:"; tail -40 /tmp/csi-node.log; exit 1; }
step() { echo "### $*"; }
SOCK=/csi/csi.sock
K() { LD_LIBRARY_PATH=/job ./keelctl csi --endpoint unix://$SOCK "$@"; }
# expect CODE CMD...: the call fails with that gRPC code.
expect() { local want=$1; shift; out=$(K "$@" 2>&1); echo "$out" | grep -q "error: $want:" || fail "$* answered: $out (wanted $want)"; }
ctrls() { ls -d /sys/class/nvme-subsystem/nvme-subsys*/nvme[0-9]* 2>/dev/null | grep -c . ; }
sub_ctrls() { for s in /sys/class/nvme-subsystem/nvme-subsys*; do [ "$(cat $s/subsysnqn 2>/dev/null)" = "$1" ] && ls -d $s/nvme[0-9]* 2>/dev/null; done | grep -c . ; }
# host REQUEST...: asks the host and waits until it answers "done REQUEST".
host() {
    echo "@@HOST $*"
    for i in $(seq 1 600); do
        if exec 3<>/dev/tcp/$ACK_HOST/$ACK_PORT 2>/dev/null; then
            read -r a <&3; exec 3<&-
            [ "$a" = "done $*" ] && return
        fi
        sleep 0.2
    done
    fail "host never answered $*"
}
# bytes DEV: the size of block device DEV (nvme1n1) in bytes, as the kernel has it.
bytes() { echo $(( $(cat /sys/block/$1/size) * 512 )); }
# grown DEV BYTES: waits up to 10 s for the kernel to show DEV at BYTES without being asked to rescan.
grown() { for i in $(seq 1 100); do [ "$(bytes $1)" = "$2" ] && return 0; sleep 0.1; done; return 1; }
fs_kib() { df -P -k "$1" | tail -1 | awk '{print $2}'; }

step "node plugin"
chmod +x ./csi-driver ./keelctl
mkdir -p /csi /stage /pods
LD_LIBRARY_PATH=/job RUST_LOG=info ./csi-driver --mode node --node-name app-1 --endpoint unix://$SOCK \
    --cluster-agent "$AGENT" --unstage-give-up-s 30 > /tmp/csi-node.log 2>&1 &
for i in $(seq 1 50); do [ -S $SOCK ] && break; sleep 0.2; done
info=$(K info) || fail "info: $info"
echo "$info" | grep -q 'csi.keelson.io' || fail "plugin name: $info"
echo "$info" | grep -q '"app-1"' || fail "node id: $info"
echo "$info" | grep -q 'topology.keelson.io/node' || fail "topology: $info"
ok "node plugin serving: csi.keelson.io, node app-1"

# fs_round NAME VOL NQN ADDR FS
fs_round() {
    local name=$1 vol=$2 nqn=$3 addr=$4 fs=$5
    local st=/stage/$name tgt=/pods/$name/mount
    local ctx=(--nqn "$nqn" --addresses "$addr" --host-nqn "$HOSTNQN")
    step "$fs: stage, publish, write"
    K stage $vol $st "${ctx[@]}" --fs $fs > /dev/null || fail "stage $fs"
    K stage $vol $st "${ctx[@]}" --fs $fs > /dev/null || fail "stage again"
    grep -q " $st $fs " /proc/mounts || fail "$st is not mounted as $fs: $(grep $st /proc/mounts)"
    expect AlreadyExists stage $vol $st "${ctx[@]}" --fs $([ $fs = ext4 ] && echo xfs || echo ext4)
    expect AlreadyExists stage $vol $st "${ctx[@]}" --block
    mkdir -p /pods/$name
    K publish $vol $st $tgt --fs $fs > /dev/null || fail "publish"
    K publish $vol $st $tgt --fs $fs > /dev/null || fail "publish again"
    [ -d $tgt ] && grep -q " $tgt " /proc/mounts || fail "$tgt not mounted"
    echo "hello from $fs" > $tgt/hello
    dd if=/dev/urandom of=$tgt/data bs=1M count=4 2>/dev/null
    sum=$(md5sum < $tgt/data)
    sync
    stats=$(K stats $vol $tgt) || fail "stats: $stats"
    echo "$stats" | grep -q "Bytes" && echo "$stats" | grep -q "Inodes" || fail "stats: $stats"
    echo "$stats" | grep -q "abnormal: false" || fail "stats condition: $stats"
    ok "$fs staged (mkfs on the blank volume) and published, 4 MiB written, stats: $(echo "$stats" | grep -m1 -A1 'available' | tr -s ' \n' ' ')"
    step "$fs: online expansion"
    local blk old new before after
    blk=$(basename "$(grep " $st " /proc/mounts | cut -d' ' -f1)")
    old=$(bytes $blk); new=$(( old + 64 * 1048576 )); before=$(fs_kib $tgt)
    host grow $vol $new
    grown $blk $new || fail "the kernel did not see $vol grow to $new bytes: $(bytes $blk)"
    K expand $vol $tgt --staging $st --required $new > /dev/null || fail "expand"
    K expand $vol $tgt --staging $st --required $new > /dev/null || fail "expand again"
    after=$(fs_kib $tgt)
    [ $after -gt $(( before + 48 * 1024 )) ] || fail "$fs did not grow: $before -> $after KiB"
    [ "$(md5sum < $tgt/data)" = "$sum" ] || fail "data changed by the growth"
    dd if=/dev/urandom of=$tgt/more bs=1M count=4 2>/dev/null && sync || fail "write after the growth"
    expect NotFound expand $vol /pods/nowhere --required $new
    ok "$fs grew online from $old to $new bytes (the kernel saw it from the target's notice), file system $before -> $after KiB, data intact"
    step "$fs: unpublish, unstage, stage again"
    K unpublish $vol $tgt > /dev/null || fail "unpublish"
    [ -e $tgt ] && fail "$tgt left behind"
    K unpublish $vol $tgt > /dev/null || fail "unpublish again"
    K unstage $vol $st > /dev/null || fail "unstage"
    grep -q " $st " /proc/mounts && fail "$st still mounted"
    [ "$(sub_ctrls $nqn)" = 0 ] || fail "controllers of $nqn left: $(sub_ctrls $nqn)"
    K unstage $vol $st > /dev/null || fail "unstage again"
    K stage $vol $st "${ctx[@]}" --fs $fs > /dev/null || fail "stage after unstage"
    K publish $vol $st $tgt --fs $fs --read-only > /dev/null || fail "publish read-only"
    [ "$(cat $tgt/hello)" = "hello from $fs" ] || fail "file lost"
    [ "$(md5sum < $tgt/data)" = "$sum" ] || fail "data changed"
    touch $tgt/x 2>/dev/null && fail "a read-only publish took a write"
    K unpublish $vol $tgt > /dev/null || fail "unpublish"
    K unstage $vol $st > /dev/null || fail "unstage"
    ok "$fs: files intact after unstage and stage (not reformatted); read-only publish refuses writes"
}

fs_round ext4 $VOL_EXT4 $NQN_EXT4 $ADDR_EXT4 ext4
if command -v mkfs.xfs > /dev/null; then
    fs_round xfs $VOL_XFS $NQN_XFS $ADDR_XFS xfs
else
    fail "no mkfs.xfs in the guest image"
fi

step "raw block"
ctx=(--nqn "$NQN_BLOCK" --addresses "$ADDR_BLOCK" --host-nqn "$HOSTNQN")
K stage $VOL_BLOCK /stage/block "${ctx[@]}" --block > /dev/null || fail "stage block"
mkdir -p /pods/block
K publish $VOL_BLOCK /stage/block /pods/block/dev --block > /dev/null || fail "publish block"
[ -f /pods/block/dev ] || [ -b /pods/block/dev ] || fail "no device at the target"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=2 2>/dev/null
dd if=/tmp/pattern of=/pods/block/dev bs=1M count=2 oflag=direct conv=fsync 2>/dev/null || fail "write to the block volume"
dd if=/pods/block/dev of=/tmp/readback bs=1M count=2 iflag=direct 2>/dev/null || fail "read the block volume"
cmp /tmp/readback /tmp/pattern || fail "block data differs"
stats=$(K stats $VOL_BLOCK /pods/block/dev) || fail "stats: $stats"
echo "$stats" | grep -q "total: $BLOCK_BYTES" || fail "block stats: $stats"
blk=$(for b in /sys/block/*; do n=$(basename $b); echo $n | grep -qE '^nvme[0-9]+n[0-9]+$' && [ "$(cat $b/uuid)" = "$VOL_BLOCK" ] && echo $n; done)
[ -n "$blk" ] || fail "no multipath device with namespace UUID $VOL_BLOCK"
new=$(( BLOCK_BYTES + 32 * 1048576 ))
host grow-block $VOL_BLOCK $new
grown $blk $new || fail "the kernel did not see the block volume grow: $(bytes $blk)"
K expand $VOL_BLOCK /pods/block/dev --required $new --block > /dev/null || fail "expand block"
dd if=/tmp/pattern of=/pods/block/dev bs=1M seek=$(( new / 1048576 - 2 )) count=2 oflag=direct conv=fsync 2>/dev/null || fail "write at the grown end"
dd if=/pods/block/dev of=/tmp/readback bs=1M skip=$(( new / 1048576 - 2 )) count=2 iflag=direct 2>/dev/null || fail "read the grown end"
cmp /tmp/readback /tmp/pattern || fail "data at the grown end differs"
ok "raw block volume grew online to $new bytes; written and read at its new end"
K unpublish $VOL_BLOCK /pods/block/dev > /dev/null || fail "unpublish block"
[ -e /pods/block/dev ] && fail "block target left behind"
K unstage $VOL_BLOCK /stage/block > /dev/null || fail "unstage block"
ok "raw block volume: published as a device node, 2 MiB written and read back, stats total $BLOCK_BYTES"

step "bad requests"
touch /stage/not-a-dir
expect InvalidArgument stage $VOL_EXT4 /stage/not-a-dir --nqn "$NQN_EXT4" --addresses "$ADDR_EXT4" --host-nqn "$HOSTNQN"
expect InvalidArgument stage $VOL_EXT4 /stage/x --nqn "nqn.2026-11.io.keelson:vol-other" --addresses "$ADDR_EXT4" --host-nqn "$HOSTNQN"
expect FailedPrecondition publish $VOL_EXT4 /stage/never /pods/never/mount
expect NotFound stats $VOL_EXT4 /pods/nowhere
expect NotFound stage not-a-volume /stage/x --nqn "$NQN_EXT4" --addresses "$ADDR_EXT4" --host-nqn "$HOSTNQN"
ok "bad requests refused with their codes"

step "unstage after the target vanished"
ctx=(--nqn "$NQN_EXT4" --addresses "$ADDR_EXT4" --host-nqn "$HOSTNQN")
K stage $VOL_EXT4 /stage/ext4 "${ctx[@]}" --fs ext4 > /dev/null || fail "stage"
K publish $VOL_EXT4 /stage/ext4 /pods/ext4/mount --fs ext4 > /dev/null || fail "publish"
echo "late" > /pods/ext4/mount/late
host kill-target
for i in $(seq 1 100); do grep -qv live /sys/class/nvme-subsystem/nvme-subsys*/nvme[0-9]*/state 2>/dev/null && break; sleep 0.1; done
t0=$(date +%s)
timeout 120 env LD_LIBRARY_PATH=/job ./keelctl csi --endpoint unix://$SOCK unpublish $VOL_EXT4 /pods/ext4/mount > /dev/null || fail "unpublish after the target vanished"
# Each call waits 20 s for a live path and answers Unavailable (the data the page cache holds needs one); the CO
# calls again, and the call after the give-up time (30 s here) disconnects first and unmounts.
unstaged=""
for i in 1 2 3 4; do
    if timeout 120 env LD_LIBRARY_PATH=/job ./keelctl csi --endpoint unix://$SOCK unstage $VOL_EXT4 /stage/ext4 > /tmp/unstage.out 2>&1; then
        unstaged=yes; break
    fi
    grep -q Unavailable /tmp/unstage.out || fail "unstage after the target vanished: $(cat /tmp/unstage.out)"
done
[ -n "$unstaged" ] || fail "unstage after the target vanished never gave up: $(cat /tmp/unstage.out)"
took=$(( $(date +%s) - t0 ))
grep -q " /stage/ext4 " /proc/mounts && fail "still mounted"
[ "$(sub_ctrls $NQN_EXT4)" = 0 ] || fail "controllers left"
ok "unpublish and unstage with the target gone took ${took}s (no hang)"
echo "ALL-OK"
