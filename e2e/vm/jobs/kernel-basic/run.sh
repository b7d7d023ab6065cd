#!/bin/bash
# Guest side of the kernel initiator test: discovery, connect, ext4, files, verified fio at QD16 with 4 KiB and
# 128 KiB blocks, disconnect. Parameters come from ./params (TARGET, PORT, DISC_PORT, NQN, DIGESTS).
set -u
. ./params
ok() { echo "OK: $*"; }
fail() { echo "FAIL: $*"; dmesg | tail -20; exit 1; }
step() { echo "### $*"; }

dgst=""
[ "${DIGESTS:-0}" = 1 ] && dgst="--hdr-digest --data-digest"

step "discover"
nvme discover -t tcp -a "$TARGET" -s "$DISC_PORT" > /tmp/disc.out 2>&1 || { cat /tmp/disc.out; fail "nvme discover"; }
cat /tmp/disc.out
grep -q "subnqn: *$NQN" /tmp/disc.out || fail "discovery log lacks $NQN"
ok "discovery lists $NQN"

step "connect (digests=${DIGESTS:-0})"
nvme connect -t tcp -a "$TARGET" -s "$PORT" -n "$NQN" $dgst || fail "nvme connect"
for i in $(seq 1 100); do [ -b /dev/nvme0n1 ] && break; sleep 0.1; done
[ -b /dev/nvme0n1 ] || fail "no /dev/nvme0n1"
nvme list
ok "connected"
DEV=/dev/nvme0n1

step "ext4: mkfs, mount, write files, remount, read back"
mkfs.ext4 -q -F $DEV || fail mkfs
mkdir -p /mnt/v && mount $DEV /mnt/v || fail mount
for i in 1 2 3 4; do dd if=/dev/urandom of=/tmp/f$i bs=64k count=$((i*4)) 2>/dev/null; cp /tmp/f$i /mnt/v/f$i; done
sync; umount /mnt/v
echo 3 > /proc/sys/vm/drop_caches
mount $DEV /mnt/v || fail remount
for i in 1 2 3 4; do cmp /tmp/f$i /mnt/v/f$i || fail "file f$i differs"; done
umount /mnt/v
ok "files read back identical"

for bs in 4k 128k; do
  step "fio verify bs=$bs iodepth=16"
  fio --name=v$bs --filename=$DEV --rw=randwrite --bs=$bs --size=${FIO_SIZE:-24M} --direct=1 --ioengine=libaio \
      --iodepth=16 --verify=crc32c --verify_fatal=1 --do_verify=1 --output=/tmp/fio-$bs.out > /dev/null 2>&1
  rc=$?
  grep -E "IOPS|err=" /tmp/fio-$bs.out | head -3
  [ $rc = 0 ] || { cat /tmp/fio-$bs.out; fail "fio bs=$bs"; }
  grep -q "err= 0" /tmp/fio-$bs.out || fail "fio bs=$bs reported errors"
  ok "fio bs=$bs verified"
done

step "disconnect"
nvme disconnect -n "$NQN" || fail "nvme disconnect"
sleep 0.5
[ -b /dev/nvme0n1 ] && fail "device still present after disconnect"
ok "disconnected"
echo "ALL-OK"
