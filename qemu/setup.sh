#!/usr/bin/env bash
# Install what the QEMU guest tests and the demo need, idempotently and without questions:
#   - qemu-system-x86 (QEMU with TCG and vhost-user-blk-pci),
#   - busybox-static and cpio (to build the guest initramfs),
#   - a Debian cloud kernel, fetched with `apt-get download` and unpacked with `dpkg -x` into
#     qemu/cache/kernel/ (nothing is installed into /boot).
#
# Runs as root (or through sudo). Only what is missing is installed; `apt-get update` runs only
# when something has to be installed or downloaded. On success it prints the paths it set up.
#
# Why the backports fallback: machines that already carry qemu-utils 10.x from
# bookworm-backports cannot install Debian 12's qemu-system-x86 7.2 (qemu-utils 10 Breaks
# qemu-system-common < 8.0). When the plain install fails, this script adds a
# bookworm-backports sources entry for the archive the machine already uses and installs
# qemu-system-x86 from there.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${SNAPMV_QEMU_CACHE:-$HERE/cache}"
KDIR="$CACHE/kernel"

mkdir -p "$CACHE"
# Several test processes may call this at once: one at a time (apt holds its own lock too, but
# the kernel unpack into $KDIR must not race).
exec 9>"$CACHE/.setup.lock"
flock 9

say() { printf 'setup: %s\n' "$*" >&2; }
die() {
    printf 'setup: error: %s\n' "$*" >&2
    exit 1
}

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    fi
fi
as_root() {
    if [ "$(id -u)" -ne 0 ] && [ ${#SUDO[@]} -eq 0 ]; then
        die "need root to run: $* (run this script as root or install sudo)"
    fi
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive "$@"
}

APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        as_root apt-get update -q >/dev/null || die "apt-get update failed"
        APT_UPDATED=1
    fi
}
apt_install() {
    # --no-remove: never let the resolver "solve" a conflict by removing installed packages
    # (a plain qemu-system-x86 7.2 install would otherwise remove a backported qemu-utils 10).
    as_root apt-get install -y -q --no-install-recommends --no-remove "$@"
}

# --- backports sources entry -------------------------------------------------------------
# Writes /etc/apt/sources.list.d/snapmv-bookworm-backports.sources from the URIs/Signed-By of
# the stanza in /etc/apt/sources.list.d/debian.sources (deb822) whose Suites contain `bookworm`,
# or from the first `deb URI bookworm` line of /etc/apt/sources.list.
add_backports() {
    local codename uri signed out
    codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
    [ -n "$codename" ] || die "cannot tell the Debian codename from /etc/os-release"
    out="/etc/apt/sources.list.d/snapmv-${codename}-backports.sources"
    if [ -e "$out" ]; then
        say "$out already present"
        return 0
    fi
    uri=""
    signed=""
    if [ -r /etc/apt/sources.list.d/debian.sources ]; then
        # Pick the stanza whose Suites line has the plain codename (not -security).
        read -r uri signed < <(awk -v cn="$codename" '
            BEGIN { RS = ""; FS = "\n" }
            {
                u = ""; s = ""; ok = 0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { u = $i; sub(/^URIs:[ \t]*/, "", u); sub(/[ \t].*/, "", u) }
                    if ($i ~ /^Signed-By:/) { s = $i; sub(/^Signed-By:[ \t]*/, "", s) }
                    if ($i ~ /^Suites:/) {
                        n = split($i, w, /[ \t]+/)
                        for (j = 2; j <= n; j++) if (w[j] == cn) ok = 1
                    }
                }
                if (ok && u != "") { print u, (s == "" ? "-" : s); exit }
            }' /etc/apt/sources.list.d/debian.sources) || true
    fi
    if [ -z "$uri" ] && [ -r /etc/apt/sources.list ]; then
        uri="$(awk -v cn="$codename" '$1 == "deb" && $3 == cn { print $2; exit }' /etc/apt/sources.list)"
        signed="-"
    fi
    [ -n "$uri" ] || uri="http://deb.debian.org/debian"
    say "adding ${codename}-backports from $uri ($out)"
    {
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: ${codename}-backports"
        echo "Components: main"
        if [ -n "$signed" ] && [ "$signed" != "-" ]; then
            echo "Signed-By: $signed"
        fi
    } | as_root tee "$out" >/dev/null
    APT_UPDATED=0
    apt_update
}

# --- packages --------------------------------------------------------------------------------
have_qemu() { command -v qemu-system-x86_64 >/dev/null 2>&1; }
have_busybox() { [ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 && file_is_static /bin/busybox; }
file_is_static() {
    # busybox-static's binary has no ELF interpreter; a dynamic busybox would not run in the
    # initramfs. `ldd` says "not a dynamic executable" (exit 1) for static binaries.
    ! ldd "$1" >/dev/null 2>&1
}
have_cpio() { command -v cpio >/dev/null 2>&1; }
# The NBD export tests use real clients: qemu-img (qemu-utils) and nbdinfo (libnbd-bin).
have_qemu_img() { command -v qemu-img >/dev/null 2>&1; }
have_nbdinfo() { command -v nbdinfo >/dev/null 2>&1; }

if ! have_qemu; then
    apt_update
    say "installing qemu-system-x86"
    if ! apt_install qemu-system-x86; then
        codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
        say "plain install of qemu-system-x86 failed; retrying from ${codename}-backports"
        add_backports
        apt_install -t "${codename}-backports" qemu-system-x86 ||
            die "could not install qemu-system-x86 (plain and ${codename}-backports both failed)"
    fi
    have_qemu || die "qemu-system-x86_64 still missing after installing qemu-system-x86"
fi

missing=()
have_busybox || missing+=(busybox-static)
have_cpio || missing+=(cpio)
have_qemu_img || missing+=(qemu-utils)
have_nbdinfo || missing+=(libnbd-bin)
if [ ${#missing[@]} -gt 0 ]; then
    apt_update
    say "installing ${missing[*]}"
    # Not apt_install: busybox-static replaces a dynamic `busybox` package if one is installed,
    # and that removal is wanted.
    as_root apt-get install -y -q --no-install-recommends "${missing[@]}" ||
        die "could not install ${missing[*]}"
fi
have_busybox || die "/bin/busybox is missing or not static after installing busybox-static"
have_cpio || die "cpio missing after install"
have_qemu_img || die "qemu-img missing after installing qemu-utils"
have_nbdinfo || die "nbdinfo missing after installing libnbd-bin"

# --- guest kernel ------------------------------------------------------------------------------
kernel_ok() {
    [ -s "$KDIR/vmlinuz" ] && [ -d "$KDIR/modules" ] &&
        [ -n "$(find "$KDIR/modules" -name 'virtio_blk.ko*' -print -quit 2>/dev/null)" ]
}

if ! kernel_ok; then
    command -v dpkg >/dev/null 2>&1 || die "dpkg is needed to unpack the guest kernel"
    apt_update
    pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-/ { print $2; exit }')"
    [ -n "$pkg" ] || die "apt-cache knows no linux-image-cloud-amd64 (is this Debian with main enabled?)"
    say "fetching guest kernel $pkg (apt-get download, unpacked into $KDIR, not installed)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    # apt-get download writes into the current directory; _apt must be able to write there.
    chmod 0777 "$tmp"
    (cd "$tmp" && apt-get download -q "$pkg" >/dev/null) || die "apt-get download $pkg failed"
    deb="$(ls "$tmp"/*.deb 2>/dev/null | head -n1)"
    [ -n "$deb" ] || die "apt-get download $pkg produced no .deb"
    mkdir -p "$tmp/x"
    dpkg -x "$deb" "$tmp/x" || die "dpkg -x $deb failed"
    vmlinuz="$(ls "$tmp"/x/boot/vmlinuz-* 2>/dev/null | head -n1)"
    moddir="$(ls -d "$tmp"/x/lib/modules/* 2>/dev/null | head -n1)"
    if [ -z "$vmlinuz" ] || [ -z "$moddir" ]; then
        die "$deb has no boot/vmlinuz-* or lib/modules/*"
    fi
    rm -rf "$KDIR.new"
    mkdir -p "$KDIR.new"
    cp "$vmlinuz" "$KDIR.new/vmlinuz"
    # Keep only what the guest needs: the virtio core and virtio_blk.
    mkdir -p "$KDIR.new/modules"
    (cd "$moddir/kernel" && find drivers/virtio drivers/block -name 'virtio*.ko*' -print0 |
        xargs -0 cp --parents -t "$KDIR.new/modules")
    basename "$moddir" >"$KDIR.new/version"
    rm -rf "$KDIR"
    mv "$KDIR.new" "$KDIR"
    rm -rf "$tmp"
    trap - EXIT
    kernel_ok || die "guest kernel unpacked into $KDIR but vmlinuz or virtio_blk is missing"
fi

say "ready: qemu $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}'), kernel $(cat "$KDIR/version"), $KDIR"
