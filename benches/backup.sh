#!/bin/bash
# Backups and NBD throughput, by hand (not part of snapmv-bench's scenarios yet):
#   full export of a snapshot  vs  dd bs=1M of the same bytes (to tmpfs and to disk, fsynced)
#   NBD reads of a snapshot export  vs  qemu-nbd serving the same raw file (nbdcopy to null:,
#   qemu-img convert)
# Usage: benches/backup.sh [SIZE_MIB] [DIR]   (needs a release build, qemu-nbd, nbdcopy)
set -euo pipefail
SIZE_MIB=${1:-1024}
DIR=${2:-$(mktemp -d /tmp/snapmv-backup-bench.XXXXXX)}
HERE=$(cd "$(dirname "$0")/.." && pwd)
B=${SNAPMV_BIN:-$HERE/target/release/snapmv}
[ -x "$B" ] || (cd "$HERE" && cargo build --release -p snapmv)
S="$B --rpc-socket $DIR/rpc.sock"
cd "$DIR"
head -c $((SIZE_MIB << 20)) /dev/urandom > origin.raw
truncate -s $((SIZE_MIB / 2 + 64))M store.cow
"$B" --rpc-socket "$DIR/rpc.sock" serve --state-dir "$DIR/state" --socket-dir "$DIR/s" > daemon.log 2>&1 &
DAEMON=$!
qemu-nbd -r -f raw -k "$DIR/qn.sock" --persistent origin.raw &
QNBD=$!
trap 'kill $DAEMON $QNBD 2>/dev/null; rm -f /dev/shm/snapmv-bench-*' EXIT
sleep 1
$S create vol "$DIR/origin.raw" "$DIR/store.cow" -b -f >/dev/null
$S snapshot vol >/dev/null
$S create s1n "$DIR/origin.raw" "$DIR/store.cow" 1 -r --nbd >/dev/null
cat origin.raw > /dev/null
t() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
echo "size ${SIZE_MIB} MiB; seconds per run"
for i in 1 2 3 4 5; do
  a=$(t dd if=origin.raw of=/dev/shm/snapmv-bench-dd bs=1M); rm -f /dev/shm/snapmv-bench-dd
  b=$(t $S export vol 1 /dev/shm/snapmv-bench-exp); rm -f /dev/shm/snapmv-bench-exp
  c=$(t dd if=origin.raw of=dd.out bs=1M conv=fsync); rm -f dd.out; sync
  d=$(t $S export vol 1 "$DIR/exp.raw"); rm -f exp.raw; sync
  e=$(t nbdcopy "nbd+unix:///s1n?socket=$DIR/s/s1n.sock" null:)
  f=$(t nbdcopy "nbd+unix:///?socket=$DIR/qn.sock" null:)
  echo "tmpfs: dd $a export $b | disk+fsync: dd $c export $d | nbdcopy: snapmv $e qemu-nbd $f"
done
