#!/usr/bin/env bash
# Boot a small QEMU guest (TCG) with one or more vhost-user-blk disks and print its serial
# console on stdout.
#
#   qemu/run-guest.sh --initrd INITRD --disk SOCK[,queues=N] [--disk ...] [options]
#
# Options:
#   --initrd FILE      initramfs built by qemu/mkinitramfs.sh (required)
#   --disk SOCK[,queues=N][,reconnect-ms=MS]
#                      a vhost-user-blk socket; becomes /dev/vda, /dev/vdb, ... in that order;
#                      queues = the device's num-queues (default 1); reconnect-ms = the
#                      chardev reconnects MS ms after losing the backend (a backend restart is
#                      then a pause for the guest, see docs/upgrade.md)
#   --kernel FILE      default: qemu/cache/kernel/vmlinuz (from qemu/setup.sh)
#   --smp N            vCPUs (default 1)
#   --mem SIZE         guest memory, a QEMU size (default 512M)
#   --append WORDS     extra kernel command line; NAME=VALUE words reach the guest script as
#                      environment variables
#   --timeout SECS     kill QEMU after SECS seconds (default 300); exit status 124 then
#   --log FILE         also copy the console to FILE
#   --stdin            connect this script's stdin to the guest console (default: /dev/null),
#                      so the host can send lines the guest script reads from /dev/console
#   --qmp SOCK         serve QMP on the unix socket SOCK (a test drives migration through it)
#   --incoming URI     wait for an incoming migration on URI (e.g. unix:/path), as the
#                      destination of a live migration; the other options must match the
#                      source's
#
# Exit status: the guest script's status when the guest printed `SNAPMV-GUEST-END rc=N`
# (mkinitramfs.sh's /init), 124 on timeout, otherwise 125 (QEMU failed or the guest died
# before finishing).
#
# The kernel prints only emergencies on the console (loglevel=1), so that its messages cannot
# split the guest script's output lines.
#
# KVM is not used: on these hosts /dev/kvm is para-virtualised and a stock kernel hangs under
# it, so the guest runs under TCG (`-accel tcg -cpu max`), which boots in a few seconds.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SNAPMV_QEMU_CACHE:-$HERE/cache}"

die() {
    printf 'run-guest: error: %s\n' "$*" >&2
    exit 125
}

kernel="$CACHE/kernel/vmlinuz"
initrd=""
smp=1
mem=512M
append=""
timeout_s=300
log=""
keep_stdin=0
qmp=""
incoming=""
disks=()
while [ $# -gt 0 ]; do
    case "$1" in
    --initrd) initrd="${2:?}"; shift 2 ;;
    --kernel) kernel="${2:?}"; shift 2 ;;
    --disk) disks+=("${2:?}"); shift 2 ;;
    --smp) smp="${2:?}"; shift 2 ;;
    --mem) mem="${2:?}"; shift 2 ;;
    --append) append="${2?}"; shift 2 ;;
    --timeout) timeout_s="${2:?}"; shift 2 ;;
    --log) log="${2:?}"; shift 2 ;;
    --stdin) keep_stdin=1; shift ;;
    --qmp) qmp="${2:?}"; shift 2 ;;
    --incoming) incoming="${2:?}"; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ -n "$initrd" ] || die "--initrd is required"
[ -r "$initrd" ] || die "initramfs $initrd is not readable"
[ -r "$kernel" ] || die "guest kernel $kernel is not readable: run qemu/setup.sh first"
command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 missing: run qemu/setup.sh first"

# shellcheck disable=SC2054 # the commas are inside QEMU option values
args=(
    -accel tcg -cpu max -m "$mem" -smp "$smp"
    -nographic -no-reboot
    -object "memory-backend-memfd,id=mem,size=$mem,share=on" -machine q35,memory-backend=mem
    -kernel "$kernel" -initrd "$initrd"
    -append "console=ttyS0 quiet loglevel=1 panic=-1 $append"
    -nic none
)
i=0
for d in "${disks[@]}"; do
    sock="${d%%,*}"
    queues=1
    reconnect=""
    rest="${d#"$sock"}"
    while [ -n "$rest" ]; do
        rest="${rest#,}"
        opt="${rest%%,*}"
        rest="${rest#"$opt"}"
        case "$opt" in
        queues=*) queues="${opt#queues=}" ;;
        reconnect-ms=*) reconnect=",reconnect-ms=${opt#reconnect-ms=}" ;;
        *) die "bad --disk option '$opt' (want SOCK[,queues=N][,reconnect-ms=MS])" ;;
        esac
    done
    [ -S "$sock" ] || die "vhost-user socket $sock does not exist"
    args+=(-chardev "socket,id=c$i,path=$sock$reconnect"
        -device "vhost-user-blk-pci,chardev=c$i,num-queues=$queues")
    i=$((i + 1))
done

[ -z "$qmp" ] || args+=(-qmp "unix:$qmp,server=on,wait=off")
[ -z "$incoming" ] || args+=(-incoming "$incoming")

if [ "$keep_stdin" -eq 1 ]; then
    exec 3<&0
else
    exec 3</dev/null
fi
console="$(mktemp)"
trap 'rm -f "$console"' EXIT
set +e
timeout --foreground --kill-after=10 "$timeout_s" qemu-system-x86_64 "${args[@]}" <&3 2>&1 |
    tee "$console" ${log:+"$log"}
status=("${PIPESTATUS[@]}")
set -e
qemu_rc="${status[0]}"
if [ "$qemu_rc" -eq 124 ] || [ "$qemu_rc" -eq 137 ]; then
    echo "run-guest: QEMU killed after ${timeout_s}s timeout" >&2
    exit 124
fi
rc="$(sed -n 's/.*SNAPMV-GUEST-END rc=\([0-9][0-9]*\).*/\1/p' "$console" | tail -n1)"
if [ -z "$rc" ]; then
    echo "run-guest: the guest did not finish (QEMU exit status $qemu_rc)" >&2
    exit 125
fi
exit "$rc"
