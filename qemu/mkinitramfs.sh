#!/usr/bin/env bash
# Build a tiny guest initramfs: static busybox, the virtio modules of the cached Debian cloud
# kernel (see setup.sh) and an /init that runs one shell script, then powers the guest off.
#
#   qemu/mkinitramfs.sh OUT.cpio.gz GUEST_SCRIPT
#
# GUEST_SCRIPT runs under busybox `sh` as root with /proc, /sys and /dev mounted and the virtio
# block driver loaded (it waits up to 30 s for /dev/vda when a virtio disk is present). Kernel
# command-line words of the form NAME=VALUE (no dot in NAME) reach it as environment variables,
# so one initramfs can serve several boots (run-guest.sh --append 'MODE=verify').
#
# Markers printed on the serial console, one per line, for the host to grep:
#   SNAPMV-GUEST-READY disks=<list>      modules loaded, before GUEST_SCRIPT runs
#   SNAPMV-GUEST-ERROR <what failed>     module or mount failure (the script still runs)
#   SNAPMV-GUEST-END rc=<N>              GUEST_SCRIPT exited with status N
# After the END marker the guest runs `sync` and `poweroff -f`.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SNAPMV_QEMU_CACHE:-$HERE/cache}"
KDIR="$CACHE/kernel"

die() {
    printf 'mkinitramfs: error: %s\n' "$*" >&2
    exit 1
}

[ $# -eq 2 ] || die "usage: $0 OUT.cpio.gz GUEST_SCRIPT"
out="$1"
script="$2"
[ -r "$script" ] || die "guest script $script is not readable"
[ -x /bin/busybox ] || die "/bin/busybox missing: run qemu/setup.sh first"
command -v cpio >/dev/null 2>&1 || die "cpio missing: run qemu/setup.sh first"
[ -d "$KDIR/modules" ] || die "no guest kernel modules in $KDIR: run qemu/setup.sh first"

# Dependency order matters: a wrong order fails with "Unknown symbol".
MODULES="drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev
drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk"

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,proc,sys,dev,tmp,mnt,lib/modules}
cp /bin/busybox "$root/bin/busybox"

mods=""
for m in $MODULES; do
    name="$(basename "$m")"
    src=""
    for ext in ko ko.xz ko.zst ko.gz; do
        if [ -e "$KDIR/modules/$m.$ext" ]; then
            src="$KDIR/modules/$m.$ext"
            break
        fi
    done
    [ -n "$src" ] || die "module $m not found under $KDIR/modules"
    case "$src" in
    *.ko) cp "$src" "$root/lib/modules/$name.ko" ;;
    *.xz) xz -dc "$src" >"$root/lib/modules/$name.ko" ;;
    *.zst) zstd -dc "$src" >"$root/lib/modules/$name.ko" ;;
    *.gz) gzip -dc "$src" >"$root/lib/modules/$name.ko" ;;
    esac
    mods="$mods $name"
done

cp "$script" "$root/guest.sh"

cat >"$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
/bin/busybox --install -s /sbin
export PATH=/bin:/sbin
mount -t proc proc /proc || echo "SNAPMV-GUEST-ERROR mount proc"
mount -t sysfs sysfs /sys || echo "SNAPMV-GUEST-ERROR mount sysfs"
mount -t devtmpfs devtmpfs /dev || echo "SNAPMV-GUEST-ERROR mount devtmpfs"
mount -t tmpfs tmpfs /tmp || echo "SNAPMV-GUEST-ERROR mount tmpfs"
for m in$mods; do
    insmod /lib/modules/\$m.ko || echo "SNAPMV-GUEST-ERROR insmod \$m"
done
# virtio_blk probes asynchronously: wait for the first disk if a virtio disk is on the bus.
if grep -qs 0x0002 /sys/bus/virtio/devices/*/device; then
    i=0
    while [ ! -b /dev/vda ] && [ \$i -lt 300 ]; do
        sleep 0.1
        i=\$((i + 1))
    done
    [ -b /dev/vda ] || echo "SNAPMV-GUEST-ERROR /dev/vda did not appear"
fi
echo "SNAPMV-GUEST-READY disks=\$(cd /sys/block && ls -d vd* 2>/dev/null | tr '\n' ' ')"
sh /guest.sh
rc=\$?
sync
echo "SNAPMV-GUEST-END rc=\$rc"
poweroff -f
EOF
chmod 0755 "$root/init" "$root/guest.sh"

tmp_out="$out.tmp.$$"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$tmp_out"
mv "$tmp_out" "$out"
