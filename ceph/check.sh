#!/usr/bin/env bash
# Shows that the test cluster of ceph/cluster.sh serves RBD images, without the kernel's rbd
# module (no `rbd map`): the rbd CLI, librbd through python3-rbd, the exclusive lock, fencing
# by blocklist, and qemu-img when this machine's QEMU has its rbd block driver.
#
#   ceph/check.sh          functional checks (the cluster must be started)
#   ceph/check.sh bench    rbd bench: 4 KiB random writes and reads, 1 and 4 threads
#
# Uses $SNAPMV_CEPH_DIR like cluster.sh. Images it makes are removed at the end.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${SNAPMV_CEPH_DIR:-/tmp/snapmv-ceph}
POOL=${SNAPMV_CEPH_POOL:-snapmv}
export CEPH_CONF=$DIR/ceph.conf SNAPMV_CEPH_POOL=$POOL
SCRATCH=$(mktemp -d)
IMAGES=()

say() { printf '\n== %s\n' "$*"; }
die() {
    printf 'ceph/check.sh: error: %s\n' "$*" >&2
    exit 1
}
cleanup() {
    local i
    for i in "${IMAGES[@]}"; do
        rbd snap purge "$POOL/$i" >/dev/null 2>&1 || true
        rbd rm --no-progress "$POOL/$i" >/dev/null 2>&1 || true
    done
    rm -rf -- "$SCRATCH"
}
trap cleanup EXIT

[[ -e $CEPH_CONF ]] || die "no cluster in $DIR: run ceph/cluster.sh start"
timeout 30 ceph health >/dev/null || die "the cluster in $DIR does not answer: run ceph/cluster.sh start"

check() {
    local img=check-t1-$$
    IMAGES+=("$img" "check-imp-$$" "check-fence-$$")

    say "create $POOL/$img (64 MiB) and show it"
    rbd create "$POOL/$img" --size 64M
    rbd info "$POOL/$img"

    say "rbd import / export: 8 MiB of random data round-trips"
    head -c 8M /dev/urandom >"$SCRATCH/in"
    rbd import --no-progress "$SCRATCH/in" "$POOL/check-imp-$$"
    rbd export --no-progress "$POOL/check-imp-$$" "$SCRATCH/out"
    cmp "$SCRATCH/in" "$SCRATCH/out" || die "rbd export differs from what rbd import wrote"
    echo "equal"

    say "rbd bench --io-type write (4 MiB of 4 KiB random writes) as client.snapmv (rbd profile)"
    rbd --id snapmv bench --io-type write --io-size 4K --io-pattern rand --io-threads 2 --io-total 4M "$POOL/$img" | tail -n 1

    say "python3-rbd: 4 KiB write and read at an offset, snapshot, lock and watcher"
    /usr/bin/python3 "$HERE/rbd_check.py" io "$img"

    say "fencing: the exclusive-lock owner is blocklisted, its next write fails, another client takes over"
    /usr/bin/python3 "$HERE/rbd_check.py" blocklist "check-fence-$$" 2>"$SCRATCH/fence.err" ||
        {
            cat "$SCRATCH/fence.err" >&2
            die "blocklist check failed"
        }
    echo "(librbd's own messages of the fenced client: $(grep -c . "$SCRATCH/fence.err") lines, e.g.)"
    grep -m 3 -E 'blocklisted|\(108\)' "$SCRATCH/fence.err" || true

    say "takeover after SIGKILL of the lock owner: by waiting, and by an explicit lock break"
    IMAGES+=("check-takeover-$$")
    /usr/bin/python3 "$HERE/rbd_check.py" takeover "check-takeover-$$" 2>"$SCRATCH/takeover.err" ||
        {
            cat "$SCRATCH/takeover.err" >&2
            die "takeover check failed"
        }

    say "handover (live migration's switch-over): release, acquire, the old owner can no longer write"
    IMAGES+=("check-handover-$$")
    /usr/bin/python3 "$HERE/rbd_check.py" handover "check-handover-$$" 2>"$SCRATCH/handover.err" ||
        {
            cat "$SCRATCH/handover.err" >&2
            die "handover check failed"
        }

    say "client.snapmv (profile rbd) may add a blocklist entry, not remove one"
    ceph --id snapmv osd blocklist add 127.0.0.2:0/1 60
    if ceph --id snapmv osd blocklist rm 127.0.0.2:0/1 2>"$SCRATCH/rm.err"; then
        die "client.snapmv could remove a blocklist entry"
    fi
    echo "client.snapmv: osd blocklist rm: $(tail -n 1 "$SCRATCH/rm.err")"
    ceph osd blocklist rm 127.0.0.2:0/1

    say "qemu-img info rbd:$POOL/$img:conf=$CEPH_CONF"
    if ! command -v qemu-img >/dev/null; then
        echo "qemu-img not installed: skipped"
    elif qemu-img info "rbd:$POOL/$img:conf=$CEPH_CONF" 2>"$SCRATCH/qemu.err"; then
        :
    else
        echo "qemu-img cannot open rbd: here (its rbd driver is in the qemu-block-extra package): $(head -n 1 "$SCRATCH/qemu.err")"
    fi

    say "all checks hold"
}

bench() {
    local img=check-bench-$$ t io
    IMAGES+=("$img")
    rbd create "$POOL/$img" --size 256M
    # Write the whole image first so reads hit data and writes overwrite allocated objects.
    rbd bench --io-type write --io-size 4M --io-pattern seq --io-threads 4 --io-total 256M "$POOL/$img" >/dev/null
    printf '%-10s %-8s %10s %12s\n' pattern threads IOPS MiB/s
    for io in write read; do
        for t in 1 4 16; do
            rbd bench --io-type "$io" --io-size 4K --io-pattern rand --io-threads "$t" --io-total 40M "$POOL/$img" |
                awk -v io="rand$io" -v t="$t" '/^elapsed/ { printf "%-10s %-8s %10.0f %12.1f\n", io, t, $6, $6 * 4096 / 1048576 }'
        done
    done
}

case ${1:-check} in
check) check ;;
bench) bench ;;
*)
    sed -n '2,8s/^# \{0,1\}//p' "$0" >&2
    exit 2
    ;;
esac
