#!/usr/bin/env bash
# snapmv in two minutes: a live snapshot of a running VM's disk, seen from a second VM.
#
#   ./qemu/demo.sh
#
# Installs what it needs (qemu/setup.sh: QEMU, busybox, a Debian cloud kernel; as root or
# through sudo), builds snapmv (release), and in a scratch directory that it deletes at the end:
# creates a sparse 256 MiB origin file and a COW store file, starts `snapmv serve`, exports the
# origin, boots a small QEMU guest on it that writes a message, takes a live snapshot with the
# CLI while that guest is running, lets the guest overwrite the message, then boots a second
# guest on the snapshot (and the origin) to show the snapshot still has the old message.
#
# Set SNAPMV_DEMO_KEEP=1 to keep the scratch directory (daemon log, guest consoles).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
show_cmd() {
    printf '  $'
    printf ' %q' "$@"
    printf '\n'
}
run() {
    show_cmd "$@"
    "$@"
}
die() {
    printf '\ndemo FAILED: %s\n' "$*" >&2
    exit 1
}

say "1. Installing what the demo needs (QEMU, busybox, a guest kernel) if it is missing"
"$HERE/setup.sh"

say "2. Building snapmv (release)"
(cd "$ROOT" && cargo build --release -p snapmv)
target_dir="$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
SNAPMV="$target_dir/release/snapmv"
[ -x "$SNAPMV" ] || die "the build did not produce $SNAPMV"

S="$(mktemp -d /tmp/snapmv-demo.XXXXXX)"
daemon_pid=""
cleanup() {
    exec 7>&- 2>/dev/null || true
    if [ -n "$daemon_pid" ] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [ "${SNAPMV_DEMO_KEEP:-0}" = 1 ]; then
        echo "scratch directory kept: $S"
    else
        rm -rf "$S"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

snapmv() {
    show_cmd snapmv --rpc-socket "$S/rpc.sock" "$@"
    "$SNAPMV" --rpc-socket "$S/rpc.sock" "$@"
}

say "3. A scratch directory $S with a sparse 256 MiB origin file and a 1 GiB sparse COW store"
run truncate -s 256M "$S/origin.img"
run truncate -s 1G "$S/cow.img"

say "4. Starting the daemon: snapmv serve (log in $S/daemon.log)"
show_cmd snapmv serve --rpc-socket "$S/rpc.sock" --state-dir "$S/state" --socket-dir "$S/sockets"
"$SNAPMV" serve --rpc-socket "$S/rpc.sock" --state-dir "$S/state" --socket-dir "$S/sockets" \
    >"$S/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do
    [ -S "$S/rpc.sock" ] && break
    kill -0 "$daemon_pid" 2>/dev/null || die "snapmv serve exited: $(cat "$S/daemon.log")"
    sleep 0.1
done
[ -S "$S/rpc.sock" ] || die "snapmv serve did not create $S/rpc.sock"

say "5. Formatting the store, binding the origin to it and exporting the origin as 'demo'"
snapmv create demo "$S/origin.img" "$S/cow.img" -b -f

# Guest 1 writes a message, waits for the host to take the snapshot, overwrites the message.
cat >"$S/guest1.sh" <<'EOF'
say() { echo "guest1: $*"; }
say "my disk /dev/vda has $(($(cat /sys/block/vda/size) / 2048)) MiB"
printf 'hello from before the snapshot\n' | dd of=/dev/vda bs=4096 conv=sync,fsync oflag=direct 2>/dev/null
say "wrote 'hello from before the snapshot' at the start of /dev/vda"
say "waiting for the host to take a snapshot"
read go < /dev/console
printf 'hello from AFTER the snapshot\n' | dd of=/dev/vda bs=4096 conv=sync,fsync oflag=direct 2>/dev/null
say "overwrote it; /dev/vda now starts with: $(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | tr -d '\000')"
EOF
# Guest 2 reads the start of each of its disks.
cat >"$S/guest2.sh" <<'EOF'
echo "guest2: /dev/vda (the snapshot) starts with: $(dd if=/dev/vda bs=4096 count=1 iflag=direct 2>/dev/null | tr -d '\000')"
echo "guest2: /dev/vdb (the origin)   starts with: $(dd if=/dev/vdb bs=4096 count=1 iflag=direct 2>/dev/null | tr -d '\000')"
EOF
"$HERE/mkinitramfs.sh" "$S/guest1.cpio.gz" "$S/guest1.sh"
"$HERE/mkinitramfs.sh" "$S/guest2.cpio.gz" "$S/guest2.sh"

# Show only what the guests say (their full consoles are in $S/guest*.log).
show() { grep --line-buffered -a '^guest[12]: ' | sed -u 's/\r$//; s/^/    /'; }
wait_for() { # wait_for FILE PATTERN PID
    while ! grep -qa "$2" "$1"; do
        kill -0 "$3" 2>/dev/null || die "the guest stopped before '$2' (see $1)"
        sleep 0.2
    done
}

say "6. Booting guest 1 (QEMU, TCG) on the origin export $S/sockets/demo.sock"
mkfifo "$S/guest1.in"
: >"$S/guest1.log"
"$HERE/run-guest.sh" --stdin --initrd "$S/guest1.cpio.gz" --disk "$S/sockets/demo.sock" \
    --timeout 300 <"$S/guest1.in" >"$S/guest1.log" 2>&1 &
guest1=$!
exec 7>"$S/guest1.in"
tail -f "$S/guest1.log" --pid=$guest1 | show &
wait_for "$S/guest1.log" "waiting for the host" $guest1

say "7. Guest 1 is running: taking a live snapshot of its disk with the CLI"
# Captured, then printed: `tee /dev/stderr` would reopen a redirected log and truncate it.
out="$(snapmv snapshot demo -m "demo: before")"
printf '%s\n' "$out"
tag="$(printf '%s\n' "$out" | sed -n 's/^snapshot \([0-9][0-9]*\) .*/\1/p')"
[ -n "$tag" ] || die "could not read the new snapshot's tag from snapmv snapshot"

say "8. Telling guest 1 to go on: it overwrites the message on the origin, then powers off"
echo go >&7
exec 7>&-
wait $guest1 || die "guest 1 failed (see $S/guest1.log)"
sleep 0.3

say "9. Exporting snapshot $tag as 'demo-snap'"
snapmv create demo-snap "$S/origin.img" "$S/cow.img" "$tag"

say "10. Booting guest 2 with two disks: the snapshot (vda) and the origin (vdb)"
"$HERE/run-guest.sh" --initrd "$S/guest2.cpio.gz" --disk "$S/sockets/demo-snap.sock" \
    --disk "$S/sockets/demo.sock" --timeout 300 >"$S/guest2.log" 2>&1 ||
    die "guest 2 failed (see $S/guest2.log)"
show <"$S/guest2.log"
grep -qa 'guest2: /dev/vda (the snapshot) starts with: hello from before the snapshot' "$S/guest2.log" ||
    die "the snapshot does not show the old message"
grep -qa 'guest2: /dev/vdb (the origin)   starts with: hello from AFTER the snapshot' "$S/guest2.log" ||
    die "the origin does not show the new message"

say "11. What the daemon knows"
snapmv list
snapmv exports
snapmv status

say "Done: the snapshot taken while guest 1 was running kept the old data; the origin has the new."
echo "Cleaning up (daemon stopped, $S removed)."
