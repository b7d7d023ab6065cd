#!/bin/bash
# build-image.sh - build a tiny QEMU guest (Debian kernel + hand-made initramfs)
# that contains the real Linux NVMe/TCP initiator (nvme-tcp, nvme-fabrics,
# nvme-core) plus the kernel target (nvmet, nvmet-tcp) for sanity checks,
# nvme-cli, kmod, e2fsprogs, busybox and (optionally) fio.
#
# Works on a fresh Debian bookworm machine with root and apt only.
#
# Usage:  [IMG=/var/tmp/keelson-vm/img] ./build-image.sh
# Env:
#   IMG=dir          output directory (default /var/tmp/keelson-vm/img)
#   FLAVOR=cloud-amd64|amd64   Debian kernel flavour (default cloud-amd64:
#                    nvme-core built in, nvme-tcp/nvmet-tcp modules, no 9p)
#   WITH_FIO=1|0     include fio + its ~60 shared libs (+~75 MiB in the cpio)
#   COMPRESS=none|gzip|zstd   initramfs compression (default none = fastest
#                    boot under TCG, biggest file)
#   SKIP_APT=1       do not apt-get install anything (tools already present)
# Output: $IMG/vmlinuz, $IMG/initramfs.cpio[.gz|.zst], $IMG/KVER, $IMG/manifest.txt
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
IMG=${IMG:-/var/tmp/keelson-vm/img}
FLAVOR=${FLAVOR:-cloud-amd64}
WITH_FIO=${WITH_FIO:-1}
COMPRESS=${COMPRESS:-none}
SKIP_APT=${SKIP_APT:-0}

log() { echo "[build-image] $*" >&2; }

# ---------------------------------------------------------------- packages
apt_install() {
    # The docker-style image here has a DPkg::Post-Invoke hook that deletes
    # /var/cache/apt/archives/*.deb after *every* dpkg run; when apt needs
    # two dpkg runs (e.g. it first removes a conflicting package such as a
    # backported qemu-utils) the second run then fails with "No such file".
    # Simply running the same install again fixes it, so retry once.
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}
if [ "$SKIP_APT" != 1 ]; then
    pkgs="qemu-system-x86 qemu-utils nvme-cli busybox-static kmod e2fsprogs xfsprogs cpio zstd iproute2 socat"
    [ "$WITH_FIO" = 1 ] && pkgs="$pkgs fio"
    need=""
    for p in $pkgs; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need="$need $p"
    done
    if [ -n "$need" ]; then
        log "apt-get install:$need"
        apt-get update -qq
        apt_install $need
    fi
fi

# ---------------------------------------------------------------- kernel
mkdir -p "$IMG/work"
W=$IMG/work
KPKG=$(apt-cache depends "linux-image-$FLAVOR" 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$KPKG" ]; then apt-get update -qq; KPKG=$(apt-cache depends "linux-image-$FLAVOR" | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); fi
KVER=${KPKG#linux-image-}
log "kernel package $KPKG (KVER=$KVER)"
if ! ls "$W"/"$KPKG"_*.deb >/dev/null 2>&1; then
    (cd "$W" && apt-get download "$KPKG")
fi
KDEB=$(ls "$W"/"$KPKG"_*.deb | head -1)
KX=$W/kernel-$KVER
if [ ! -d "$KX/lib/modules/$KVER" ]; then
    rm -rf "$KX"; mkdir -p "$KX"; dpkg -x "$KDEB" "$KX"
    depmod -b "$KX" "$KVER"
fi
cp "$KX/boot/vmlinuz-$KVER" "$IMG/vmlinuz"
echo "$KVER" > "$IMG/KVER"

# ---------------------------------------------------------------- root fs
R=$W/root
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc/nvme,proc,sys,dev,tmp,run,mnt,root,job,var/tmp}
cp /bin/busybox "$R/bin/busybox"        # busybox-static: no libs needed

copy_libs() {   # copy the ELF interpreter + all shared libs of $1
    ldd "$1" 2>/dev/null | grep -o '/[^ )]*' | while read -r lib; do
        [ -e "$R$lib" ] && continue
        mkdir -p "$R$(dirname "$lib")"
        cp -L "$lib" "$R$lib"
    done
}
copy_bin() {    # copy_bin /path/on/host [/path/in/guest]
    local src=$1 dst=${2:-$1}
    mkdir -p "$R$(dirname "$dst")"
    cp -L "$src" "$R$dst"
    copy_libs "$src"
}
# bash runs the jobs: Debian's static busybox ash prefers its own applets
# over $PATH (so "ip", "modprobe", "mke2fs" would silently be busybox's)
copy_bin "$(command -v bash)" /bin/bash
copy_bin "$(command -v nvme)" /usr/sbin/nvme
copy_bin "$(command -v kmod)" /usr/bin/kmod
for t in modprobe insmod rmmod lsmod modinfo depmod; do ln -sf /usr/bin/kmod "$R/sbin/$t"; done
copy_bin "$(command -v mke2fs)" /usr/sbin/mke2fs
ln -sf mke2fs "$R/usr/sbin/mkfs.ext4"
# file systems the CSI node plugin makes, checks and grows
for t in e2fsck resize2fs mkfs.xfs xfs_growfs xfs_repair; do copy_bin "$(command -v $t)" "/usr/sbin/$t"; done
[ "$WITH_FIO" = 1 ] && copy_bin "$(command -v fio)" /usr/bin/fio
# iproute2's ip (busybox ip lacks some bits, e.g. 'ip -j', netns); small
copy_bin "$(command -v ip)" /usr/sbin/ip

# busybox applets as symlinks, never overwriting the real tools above
/bin/busybox --list-full | while read -r a; do
    [ -e "$R/$a" ] || [ -L "$R/$a" ] || { mkdir -p "$R/$(dirname "$a")"; ln -s /bin/busybox "$R/$a"; }
done

# a fixed host NQN / host ID for the guest initiator (tests may override
# with nvme connect --hostnqn/--hostid)
HOSTID=6a2b0c1d-7e3f-4a50-9b61-c2d3e4f5a6b7
echo "nqn.2014-08.org.nvmexpress:uuid:$HOSTID" > "$R/etc/nvme/hostnqn"
echo "$HOSTID" > "$R/etc/nvme/hostid"
echo "root:x:0:0:root:/root:/bin/sh" > "$R/etc/passwd"
echo "root:x:0:" > "$R/etc/group"
printf '127.0.0.1 localhost vm\n::1 localhost\n' > "$R/etc/hosts"

# ---------------------------------------------------------------- modules
MODS="nvme-tcp nvme-fabrics nvme-core nvme nvmet nvmet-tcp null_blk brd loop configfs
      virtio_pci virtio_net virtio_blk virtio_console virtio_rng crc32c-intel crc32c_generic
      9p 9pnet_virtio tun ext4 xfs"
MD=$KX/lib/modules/$KVER
mkdir -p "$R/lib/modules/$KVER"
for m in $MODS; do
    modprobe -d "$KX" -S "$KVER" --show-depends "$m" 2>/dev/null | awk '$1=="insmod"{print $2}' || true
done | sort -u | while read -r ko; do
    rel=${ko#$MD/}
    mkdir -p "$R/lib/modules/$KVER/$(dirname "$rel")"
    cp "$ko" "$R/lib/modules/$KVER/$rel"
done
cp "$MD"/modules.order "$MD"/modules.builtin "$MD"/modules.builtin.modinfo "$R/lib/modules/$KVER/" 2>/dev/null || true
depmod -b "$R" "$KVER"

# ---------------------------------------------------------------- /init
cp "$HERE/guest-init.sh" "$R/init"
chmod 755 "$R/init"

# ---------------------------------------------------------------- cpio
rm -f "$IMG"/initramfs.cpio*
case $COMPRESS in
    none) (cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$IMG/initramfs.cpio" ;;
    gzip) (cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -6) > "$IMG/initramfs.cpio.gz" ;;
    zstd) (cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | zstd -q -10 -T0) > "$IMG/initramfs.cpio.zst" ;;
    *) echo "bad COMPRESS=$COMPRESS" >&2; exit 2 ;;
esac
# run-vm.sh appends a plain cpio (the job) to this file; the kernel only finds
# an archive that starts 4-byte aligned, and skips zero padding, so round the
# (compressed) base up to a 512-byte multiple
truncate -s %512 "$IMG"/initramfs.cpio*
{
    echo "kernel: $KPKG ($(dpkg-deb -f "$KDEB" Version))"
    for p in nvme-cli libnvme1 busybox-static kmod e2fsprogs xfsprogs fio qemu-system-x86; do
        dpkg-query -W -f='${Package} ${Version}\n' "$p" 2>/dev/null || true
    done
    echo "modules:"; (cd "$R/lib/modules/$KVER" && find . -name '*.ko*' | sort)
    echo "sizes:"; du -sh "$IMG"/vmlinuz "$IMG"/initramfs.cpio* "$R"
} > "$IMG/manifest.txt"
log "done: $(ls -la "$IMG"/vmlinuz "$IMG"/initramfs.cpio* | awk '{print $5, $9}' | tr '\n' ' ')"
