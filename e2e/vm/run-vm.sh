#!/bin/bash
# run-vm.sh - boot the vm-harness guest under QEMU, run one job inside it,
# print the job's output and exit with the job's exit status.
#
# Usage: run-vm.sh JOB            JOB = a shell script, or a directory holding
#                                 run.sh (+ any files it needs; they appear in
#                                 the guest under /job)
#        run-vm.sh -i             interactive shell on the serial console
#                                 (Ctrl-A X quits qemu)
# Env:
#   IMG=dir        image dir from build-image.sh (default /var/tmp/keelson-vm/img)
#   ACCEL=tcg|kvm  default tcg (KVM here is kvm_pvm, which cannot run a
#                  stock kernel: the guest hangs right after "Booting from ROM")
#   SMP=2 MEM=1024 vCPUs / MiB
#   NET=user|tap|none   default user (slirp)
#     user: guest 10.0.2.15/24, host loopback reachable as 10.0.2.2.
#           SLIRP_RESTRICT=1 isolates the guest; then only GUESTFWD rules work.
#           GUESTFWD="10.0.2.100:4420=127.0.0.1:4420 ..." -> guestfwd rules
#             (one socat per connection; needs the socat package)
#           HOSTFWD="127.0.0.1:14420=4420 ..." -> host listens, forwards to guest
#     tap:  NETNS=vmlab TAP=vmtap0 (see netns-setup.sh); guest 10.200.0.2/24,
#           host side 10.200.0.1 inside the netns; qemu runs inside the netns
#   VM_IP=a.b.c.d/nn   override the guest address
#   TIMEOUT=300    seconds before qemu is killed (exit 124)
#   APPEND="..."   extra kernel command line
#   LOG=file       full serial console log (default: a temp file, kept on error)
#   QEMU_EXTRA="..."  extra qemu args
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
IMG=${IMG:-/var/tmp/keelson-vm/img}
ACCEL=${ACCEL:-tcg}
SMP=${SMP:-2}
MEM=${MEM:-1024}
NET=${NET:-user}
NETNS=${NETNS:-keelson-vm}
TAP=${TAP:-kvtap0}
TIMEOUT=${TIMEOUT:-300}
APPEND=${APPEND:-}
QEMU_EXTRA=${QEMU_EXTRA:-}
SLIRP_RESTRICT=${SLIRP_RESTRICT:-0}
GUESTFWD=${GUESTFWD:-}
HOSTFWD=${HOSTFWD:-}

INTERACTIVE=0
if [ "${1:-}" = -i ]; then INTERACTIVE=1; shift; fi
JOB=${1:-}
if [ $INTERACTIVE = 0 ] && [ -z "$JOB" ]; then
    echo "usage: $0 JOB.sh|JOBDIR  |  $0 -i" >&2; exit 2
fi

INITRD=$(ls "$IMG"/initramfs.cpio* 2>/dev/null | head -1)
[ -f "$IMG/vmlinuz" ] && [ -n "$INITRD" ] || { echo "no image in $IMG (run build-image.sh)" >&2; exit 2; }

T=$(mktemp -d /tmp/vmrun.XXXXXX)
cleanup() { rm -rf "$T"; }
trap cleanup EXIT

# --- job -> extra cpio appended to the base initramfs (the kernel unpacks
#     concatenated archives in order; compressed and plain may be mixed)
if [ $INTERACTIVE = 0 ]; then
    mkdir -p "$T/r/job"
    if [ -d "$JOB" ]; then cp -a "$JOB"/. "$T/r/job/"; else cp "$JOB" "$T/r/job/run.sh"; fi
    [ -f "$T/r/job/run.sh" ] || { echo "job dir has no run.sh" >&2; exit 2; }
    (cd "$T/r" && find . | cpio -o -H newc --quiet -R 0:0) > "$T/job.cpio"
    cat "$INITRD" "$T/job.cpio" > "$T/initrd"
else
    cp "$INITRD" "$T/initrd"
fi

# --- network
NETARGS=() PREFIX=()
case $NET in
    user)
        nd="user,id=n0,net=10.0.2.0/24,host=10.0.2.2,ipv6=off"
        [ "$SLIRP_RESTRICT" = 1 ] && nd="$nd,restrict=on"
        for f in $GUESTFWD; do   # 10.0.2.100:4420=127.0.0.1:4420
            # "cmd:" spawns one socat per guest connection; a plain
            # "-tcp:host:port" target is ONE connection opened at qemu start
            # (useless for NVMe/TCP, which opens a socket per queue)
            h=${f#*=}
            nd="$nd,guestfwd=tcp:${f%%=*}-cmd:socat STDIO TCP:${h%:*}:${h##*:}"
        done
        for f in $HOSTFWD; do    # 127.0.0.1:14420=4420  (host addr:port = guest port)
            nd="$nd,hostfwd=tcp:${f%%=*}-:${f#*=}"
        done
        NETARGS=(-netdev "$nd" -device virtio-net-pci,netdev=n0)
        VM_IP=${VM_IP:-10.0.2.15/24} ;;
    tap)
        ip netns exec "$NETNS" test -e "/sys/class/net/$TAP" ||
            { echo "tap $TAP missing in netns $NETNS (run netns-setup.sh)" >&2; exit 2; }
        NETARGS=(-netdev "tap,id=n0,ifname=$TAP,script=no,downscript=no"
                 -device virtio-net-pci,netdev=n0)
        PREFIX=(ip netns exec "$NETNS")
        VM_IP=${VM_IP:-10.200.0.2/24} ;;
    none) VM_IP= ;;
    *) echo "bad NET=$NET" >&2; exit 2 ;;
esac

KARGS="console=ttyS0 quiet loglevel=3 panic=-1 ${VM_IP:+vm.ip=$VM_IP}"
[ $INTERACTIVE = 1 ] && KARGS="$KARGS vm.shell=1"
KARGS="$KARGS $APPEND"

case $ACCEL in
    kvm) ACCARGS=(-accel kvm -cpu host) ;;
    *)   ACCARGS=(-accel tcg,thread=multi -cpu max) ;;
esac

QEMU=(qemu-system-x86_64 -nodefaults -no-user-config -M pc "${ACCARGS[@]}"
      -smp "$SMP" -m "$MEM" -display none -no-reboot
      -kernel "$IMG/vmlinuz" -initrd "$T/initrd" -append "$KARGS"
      "${NETARGS[@]}" $QEMU_EXTRA)

if [ $INTERACTIVE = 1 ]; then
    exec "${PREFIX[@]}" "${QEMU[@]}" -serial mon:stdio
fi

LOG=${LOG:-$T/console.log}
start=$(date +%s.%N)
timeout -k 5 "$TIMEOUT" "${PREFIX[@]}" "${QEMU[@]}" -serial stdio < /dev/null > "$LOG" 2>&1
qrc=$?
end=$(date +%s.%N)

[ -n "${KEEP_LOG:-}" ] && cp "$LOG" "$KEEP_LOG"
# job output = lines between the markers (strip CRs from the serial line)
tr -d '\r' < "$LOG" | sed -n '/^@@VM-JOB-BEGIN$/,/^@@VM-JOB-END /p' | sed '1d;$d'
endline=$(tr -d '\r' < "$LOG" | grep -a '^@@VM-JOB-END ' | tail -1)
ready=$(tr -d '\r' < "$LOG" | grep -a -o '^@@VM-READY uptime=[0-9.]*' | tail -1)
printf '[run-vm] wall=%ss %s %s qemu_rc=%s\n' "$(awk -v a="$start" -v b="$end" 'BEGIN{printf "%.1f", b-a}')" \
    "${ready#@@VM-}" "${endline#@@VM-JOB-}" "$qrc" >&2
if [ -z "$endline" ]; then
    keep=/tmp/vmrun-failed-$$.log; cp "$LOG" "$keep" 2>/dev/null
    echo "[run-vm] no job end marker (qemu rc=$qrc); console log: $keep" >&2
    tail -n 30 "$keep" >&2
    [ $qrc = 124 ] && exit 124
    exit 125
fi
rc=${endline#*rc=}; rc=${rc%% *}
exit "$rc"
