#!/bin/bash
# Guest side of the pool test: two thin 12 MiB replicas (X and Y) in a pool with room for three 4 MiB clusters.
# Y takes two clusters and X one; data reads back; a write to X that needs a fourth cluster fails with ENOSPC
# (NVMe Capacity Exceeded), and what was written before is still there; once the guest discards Y, that write fits
# (Y's clusters went back to the pool). Then Z, a replica of a pool on a 4Kn disk:
# 4096-byte blocks, and ext4 on it keeps a file across a remount. Parameters in ./params (TARGET, PORT, NQN_X,
# NQN_Y, NQN_Z).
set -u
. ./params
ok() { echo "OK: $*"; }
fail() { echo "FAIL: $*"; dmesg | tail -20; exit 1; }
step() { echo "### $*"; }
# The block device of a connected subsystem (with native multipath, the subsystem's head namespace).
dev_of() {
    for d in /sys/class/nvme-subsystem/nvme-subsys*; do
        if [ "$(cat $d/subsysnqn)" = "$1" ]; then
            for n in $d/nvme*n1; do [ -e "/dev/$(basename $n)" ] && { echo "/dev/$(basename $n)"; return; }; done
        fi
    done
}

step "connect X and Y"
for n in "$NQN_X" "$NQN_Y"; do nvme connect -t tcp -a "$TARGET" -s "$PORT" -n "$n" || fail "nvme connect $n"; done
sleep 1
X=$(dev_of "$NQN_X"); Y=$(dev_of "$NQN_Y")
[ -b "$X" ] && [ -b "$Y" ] && [ "$X" != "$Y" ] || { nvme list; fail "devices X=$X Y=$Y"; }
ok "X=$X Y=$Y"

step "fill the pool: 8 MiB on Y, 4 MiB on X"
dd if=/dev/urandom of=/tmp/a bs=1M count=8 2>/dev/null
dd if=/tmp/a of=$Y bs=1M count=8 oflag=direct 2>/dev/null || fail "write of 8 MiB to Y"
dd if=/tmp/a of=$X bs=1M count=4 oflag=direct 2>/dev/null || fail "write of 4 MiB to X"
dd if=$Y of=/tmp/b bs=1M count=8 iflag=direct 2>/dev/null || fail "read back Y"
cmp /tmp/a /tmp/b || fail "Y differs"
ok "three clusters in use"

step "a write that needs a fourth cluster"
dd if=/tmp/a of=$X bs=1M count=1 seek=8 oflag=direct > /tmp/dd.out 2>&1 && fail "write into a full pool succeeded"
cat /tmp/dd.out
grep -q "No space left on device" /tmp/dd.out || fail "the error is not ENOSPC"
ok "ENOSPC"

step "earlier data intact, allocated clusters still writable"
dd if=/tmp/a of=$X bs=1M count=1 seek=2 skip=5 oflag=direct 2>/dev/null || fail "rewrite inside X's cluster"
dd if=$X of=/tmp/x bs=1M count=4 iflag=direct 2>/dev/null || fail "read back X"
dd if=/tmp/a of=/tmp/c bs=1M count=4 2>/dev/null
dd if=/tmp/a of=/tmp/c bs=1M count=1 seek=2 skip=5 conv=notrunc 2>/dev/null
cmp /tmp/c /tmp/x || fail "X differs after ENOSPC"
dd if=$Y of=/tmp/b bs=1M count=8 iflag=direct 2>/dev/null && cmp /tmp/a /tmp/b || fail "Y differs after ENOSPC"
ok "intact"

step "discarding Y gives its two clusters back to the pool: the write into X that failed now fits"
blkdiscard $Y || fail "blkdiscard Y"
dd if=$Y of=/tmp/b bs=1M count=8 iflag=direct 2>/dev/null || fail "read Y after the discard"
cmp /tmp/b /dev/zero 2>&1 | grep -q EOF || fail "Y does not read zeroes after the discard"
dd if=/tmp/a of=$X bs=1M count=1 seek=8 oflag=direct 2>/dev/null || fail "the write into X still fails after the discard"
dd if=$X of=/tmp/x bs=1M count=1 skip=8 iflag=direct 2>/dev/null || fail "read back X's new cluster"
dd if=/tmp/a of=/tmp/c bs=1M count=1 2>/dev/null
cmp /tmp/c /tmp/x || fail "X's new cluster differs"
ok "discard"

for n in "$NQN_X" "$NQN_Y"; do nvme disconnect -n "$n" >/dev/null || fail "nvme disconnect"; done

step "a replica on a 4Kn disk: 4096-byte blocks, a file system on it"
nvme connect -t tcp -a "$TARGET" -s "$PORT" -n "$NQN_Z" || fail "nvme connect Z"
sleep 1
Z=$(dev_of "$NQN_Z")
[ -b "$Z" ] || { nvme list; fail "device Z=$Z"; }
bs=$(cat /sys/block/$(basename $Z)/queue/logical_block_size)
[ "$bs" = 4096 ] || fail "Z shows $bs-byte blocks"
mkfs.ext4 -q -F $Z || fail "mkfs.ext4 on Z"
mkdir -p /mnt/z && mount $Z /mnt/z || fail "mount Z"
dd if=/tmp/a of=/mnt/z/f bs=1M count=4 2>/dev/null && sync || fail "write a file on Z"
umount /mnt/z && mount $Z /mnt/z || fail "remount Z"
dd if=/tmp/a of=/tmp/d bs=1M count=4 2>/dev/null
cmp /mnt/z/f /tmp/d || fail "the file on Z differs"
umount /mnt/z
nvme disconnect -n "$NQN_Z" >/dev/null || fail "nvme disconnect Z"
ok "4Kn"
echo "ALL-OK"
