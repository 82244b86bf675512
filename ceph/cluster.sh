#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for snapmv's tests and developers (issue 18).
#
#   ceph/cluster.sh install   apt packages if missing (idempotent, non-interactive)
#   ceph/cluster.sh start     bootstrap on first use, start mon + mgr + one OSD, wait for health
#   ceph/cluster.sh status    daemons, health, pools
#   ceph/cluster.sh stop      stop the daemons (data kept; `start` resumes)
#   ceph/cluster.sh destroy   stop and remove the cluster directory
#   ceph/cluster.sh env       print exports for `eval "$(ceph/cluster.sh env)"`
#
# Everything (conf, keyrings, mon/osd data, logs, admin sockets, pid files) lives under one
# directory, $SNAPMV_CEPH_DIR (default /tmp/snapmv-ceph); /etc/ceph is never read or written.
# The OSD is BlueStore on a sparse file, so data survives `stop`/`start` and an OSD restart.
# See docs/ceph.md for sizing, measurements and how to use a real cluster instead.
#
# Knobs (read at bootstrap unless said otherwise):
#   SNAPMV_CEPH_DIR        cluster directory (default /tmp/snapmv-ceph); every command
#   SNAPMV_CEPH_MON_PORT   monitor port (msgr2, 127.0.0.1); default derived from the directory
#                          (20000-29999) so clusters in different directories do not collide
#   SNAPMV_CEPH_OSD_SIZE   size of the OSD's sparse block file (default 8G)
#   SNAPMV_CEPH_OSD_CACHE  BlueStore cache size in bytes (default 134217728 = 128 MiB)
#   SNAPMV_CEPH_POOL       RBD pool to create (default snapmv)
#   SNAPMV_CEPH_TIMEOUT    seconds `start` waits for each step (default 120); every command
set -euo pipefail

DIR=${SNAPMV_CEPH_DIR:-/tmp/snapmv-ceph}
# Absolute: the paths end up in ceph.conf, and the daemons chdir to / when they fork.
DIR=$(realpath -m -- "$DIR")
POOL=${SNAPMV_CEPH_POOL:-snapmv}
OSD_SIZE=${SNAPMV_CEPH_OSD_SIZE:-8G}
OSD_CACHE=${SNAPMV_CEPH_OSD_CACHE:-134217728}
TIMEOUT=${SNAPMV_CEPH_TIMEOUT:-120}
CONF=$DIR/ceph.conf
MON_ID=a
MGR_ID=x
OSD_ID=0
DAEMONS=("mon.$MON_ID" "mgr.$MGR_ID" "osd.$OSD_ID")
PACKAGES=(ceph-mon ceph-mgr ceph-osd ceph-common librbd-dev python3-rbd)

log() { printf 'ceph/cluster.sh [%3ss]: %s\n' "$SECONDS" "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

usage() {
    sed -n '2,9s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

# ---------------------------------------------------------------------------------------------
# install

cmd_install() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]} == 0)); then
        log "packages already installed: ${PACKAGES[*]}"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "installing ${missing[*]} needs root (apt-get)"
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    local out
    out=$(mktemp)
    # Quiet unless it fails: then the tail of apt's output says why.
    if ! apt-get update -qq >"$out" 2>&1; then
        tail -n 20 "$out" >&2
        rm -f "$out"
        die "apt-get update failed"
    fi
    if ! apt-get install -y -qq -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}" >"$out" 2>&1; then
        tail -n 20 "$out" >&2
        rm -f "$out"
        die "apt-get install ${missing[*]} failed"
    fi
    rm -f "$out"
    log "installed ${missing[*]}"
}

need_binaries() {
    local b
    for b in ceph ceph-mon ceph-mgr ceph-osd ceph-authtool monmaptool rbd; do
        command -v "$b" >/dev/null || die "$b not found: run '$0 install' first"
    done
}

# ---------------------------------------------------------------------------------------------
# helpers

ceph_() { timeout "$TIMEOUT" ceph --conf "$CONF" --connect-timeout 10 "$@"; }

pidfile() { echo "$DIR/run/$1.pid"; }
logfile() { echo "$DIR/log/$1.log"; }

# pid of a running daemon NAME (mon.a ...), or nothing.
daemon_pid() {
    local f pid
    f=$(pidfile "$1")
    [[ -s $f ]] || return 0
    pid=$(<"$f")
    # The pid must still be a ceph daemon started with our conf (pids are reused).
    if [[ -r /proc/$pid/cmdline ]] && tr '\0' '\n' <"/proc/$pid/cmdline" | grep -qxF -- "$CONF"; then
        echo "$pid"
    fi
}

fail_with_log() { # NAME MESSAGE
    local f
    f=$(logfile "$1")
    log "error: $2"
    if [[ -f $f ]]; then
        # A crashing daemon appends a dump of its recent log lines: they repeat what comes
        # before, so show what precedes the dump. Errors first (level -1, failed asserts,
        # signals), then the last lines.
        local body
        body=$(sed '/--- begin dump of recent events ---/,$d' "$f")
        log "errors in $f:"
        grep -E ' -1 |FAILED|Caught signal|error' <<<"$body" | grep -v '_read_bdev_label failed to open' | tail -n 8 >&2 || true
        log "last lines of $f:"
        tail -n 12 <<<"$body" >&2
    fi
    exit 1
}

# Run a command, showing its output only when it fails.
quiet() {
    local out rc=0
    out=$("$@" 2>&1) || rc=$?
    ((rc == 0)) || printf '%s\n' "$out" >&2
    return "$rc"
}

port_in_use() { command -v ss >/dev/null && ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }

default_port() { # stable per directory, 20000-29999
    local sum
    sum=$(printf '%s' "$DIR" | cksum | cut -d' ' -f1)
    echo $((20000 + sum % 10000))
}

# ---------------------------------------------------------------------------------------------
# bootstrap (first start only)

bootstrap() {
    local port fsid osd_uuid host
    port=${SNAPMV_CEPH_MON_PORT:-$(default_port)}
    [[ $port =~ ^[0-9]+$ ]] || die "SNAPMV_CEPH_MON_PORT=$port is not a port number"
    if port_in_use "$port"; then
        die "port $port is already in use (another cluster?): set SNAPMV_CEPH_MON_PORT or SNAPMV_CEPH_DIR"
    fi
    fsid=$(cat /proc/sys/kernel/random/uuid)
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    host=$(hostname -s)
    log "bootstrapping a new cluster in $DIR (fsid $fsid, mon 127.0.0.1:$port, osd $OSD_SIZE sparse file)"
    mkdir -p "$DIR"/{run,log,crash,mon.$MON_ID,mgr.$MGR_ID,osd.$OSD_ID}
    touch "$DIR/bootstrap.incomplete"

    cat >"$CONF.tmp" <<EOF
# Written by ceph/cluster.sh: a single-node throwaway cluster. Everything lives in $DIR.
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$port]
public_addr = 127.0.0.1
# The OSD's cluster and heartbeat addresses too: nothing listens beyond loopback.
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_msgr2 = true
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = $DIR/ceph.\$name.keyring
run_dir = $DIR/run
admin_socket = $DIR/run/\$name.asok
pid_file = $DIR/run/\$name.pid
log_file = $DIR/log/\$name.log
crash_dir = $DIR/crash
log_to_stderr = false
err_to_stderr = true
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
# One copy is the point of this cluster: do not warn about it.
mon_warn_on_pool_no_redundancy = false
# The host's disk is shared; warn only when it is really full.
mon_data_avail_warn = 3
mon_data_avail_crit = 1

[client]
# Clients (rbd, python-rbd, librbd in snapmv) log here only when asked (--debug-*).
log_file = $DIR/log/\$name.\$pid.log
# One process may hold several clients (two Rados handles): one socket each.
admin_socket = $DIR/run/\$name.\$pid.\$cctid.asok

[mon]
mon_data = $DIR/mon.\$id
mon_initial_members = $MON_ID
mon_cluster_log_file = $DIR/log/cluster.log

[mgr]
mgr_data = $DIR/mgr.\$id

[osd]
osd_data = $DIR/osd.\$id
osd_objectstore = bluestore
bluestore_block_create = true
# A fresh file: a fsck right after mkfs only costs seconds.
bluestore_fsck_on_mkfs = false
bluestore_block_size = $(numfmt --from=iec "$OSD_SIZE")
bluestore_cache_autotune = false
bluestore_cache_size = $OSD_CACHE
osd_memory_target = 939524096
osd_crush_update_on_start = true
osd_crush_initial_weight = 1.0
# A file on a shared host, not a device: small queues, no discard.
bdev_enable_discard = false
osd_op_num_shards = 2
osd_op_num_threads_per_shard = 1
EOF
    mv "$CONF.tmp" "$CONF"

    # Keys: mon., client.admin (everything), mgr.x, osd.0, and client.snapmv with the rbd
    # profile (what snapmv would run as on a real cluster; the profile allows blocklisting a
    # dead exclusive-lock owner, which fencing needs).
    local monkr=$DIR/ceph.mon.keyring
    ceph-authtool --create-keyring "$monkr" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/ceph.client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/ceph.mgr.$MGR_ID.keyring" --gen-key -n "mgr.$MGR_ID" \
        --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/ceph.osd.$OSD_ID.keyring" --gen-key -n "osd.$OSD_ID" \
        --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *' >/dev/null
    ceph-authtool --create-keyring "$DIR/ceph.client.snapmv.keyring" --gen-key -n client.snapmv \
        --cap mon 'profile rbd' --cap osd "profile rbd pool=$POOL" --cap mgr "profile rbd pool=$POOL" >/dev/null
    local k
    for k in client.admin "mgr.$MGR_ID" "osd.$OSD_ID" client.snapmv; do
        ceph-authtool "$monkr" --import-keyring "$DIR/ceph.$k.keyring" >/dev/null
    done
    chmod 600 "$DIR"/ceph.*.keyring

    monmaptool --create --fsid "$fsid" --addv "$MON_ID" "[v2:127.0.0.1:$port]" "$DIR/monmap" >/dev/null
    ceph-mon --conf "$CONF" --mkfs -i "$MON_ID" --monmap "$DIR/monmap" --keyring "$monkr" ||
        fail_with_log "mon.$MON_ID" "ceph-mon --mkfs failed"

    start_daemon "mon.$MON_ID"
    wait_for "the monitor to answer" "mon.$MON_ID" ceph_ mon stat

    quiet ceph_ osd new "$osd_uuid" "$OSD_ID" || fail_with_log "mon.$MON_ID" "ceph osd new failed"
    log "creating the OSD's BlueStore ($OSD_SIZE sparse file)"
    ceph-osd --conf "$CONF" -i "$OSD_ID" --mkfs --osd-uuid "$osd_uuid" >"$DIR/log/osd-mkfs.out" 2>&1 ||
        fail_with_log "osd.$OSD_ID" "ceph-osd --mkfs failed (its output: $DIR/log/osd-mkfs.out)"
    echo "$host" >"$DIR/host"
    touch "$DIR/bootstrapped.pending"
    rm -f "$DIR/bootstrap.incomplete"
}

# After the daemons run on first start: the pool.
finish_bootstrap() {
    [[ -e $DIR/bootstrapped.pending ]] || return 0
    log "creating pool $POOL (size 1, rbd application)"
    quiet ceph_ osd pool create "$POOL" 32 32 replicated || fail_with_log "mon.$MON_ID" "creating pool $POOL failed"
    quiet ceph_ osd pool set "$POOL" size 1 --yes-i-really-mean-it ||
        fail_with_log "mon.$MON_ID" "setting size 1 on pool $POOL failed"
    quiet timeout "$TIMEOUT" rbd --conf "$CONF" pool init "$POOL" || fail_with_log "osd.$OSD_ID" "rbd pool init $POOL failed"
    rm -f "$DIR/bootstrapped.pending"
}

# ---------------------------------------------------------------------------------------------
# daemons

start_daemon() { # NAME
    local name=$1 type id pid
    type=${name%%.*}
    id=${name#*.}
    pid=$(daemon_pid "$name")
    if [[ -n $pid ]]; then
        log "$name already running (pid $pid)"
        return 0
    fi
    rm -f "$(pidfile "$name")"
    # The daemons fork into the background themselves and write their pid file. They must not
    # inherit the lock on fd 9 (nor the caller's stdout/stderr: a test reading them would hang).
    "ceph-$type" --conf "$CONF" -i "$id" >>"$DIR/log/$name.out" 2>&1 9>&- ||
        fail_with_log "$name" "ceph-$type -i $id failed to start (see also $DIR/log/$name.out)"
    local t=0
    while [[ -z $(daemon_pid "$name") ]]; do
        ((t++ < 50)) || fail_with_log "$name" "$name wrote no pid file in 5 s"
        sleep 0.1
    done
    log "started $name (pid $(daemon_pid "$name"))"
}

# Start several daemons at once (each spends seconds initialising before it forks).
start_daemons() { # NAME...
    local name pids=() p rc=0
    for name in "$@"; do
        start_daemon "$name" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do
        wait "$p" || rc=1
    done
    ((rc == 0)) || exit 1
}

wait_for() { # WHAT NAME-OF-DAEMON-TO-BLAME CMD...
    local what=$1 who=$2 deadline
    shift 2
    deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail_with_log "$who" "timed out after ${TIMEOUT}s waiting for $what"
        [[ -n $(daemon_pid "$who") ]] || fail_with_log "$who" "$who exited while waiting for $what"
        sleep 1
    done
}

osd_up() { ceph_ osd dump --format json | /usr/bin/python3 -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if any(o["up"] for o in d["osds"]) else 1)'; }
mgr_up() { ceph_ mgr stat --format json | /usr/bin/python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin).get("available") else 1)'; }
health_ok() { [[ $(ceph_ health 2>/dev/null) == HEALTH_OK* ]]; }

# Serialise start/stop/destroy on one directory: tests running in parallel may all call
# `start`; the later ones wait, then find the cluster running.
lock_dir() {
    mkdir -p "$DIR"
    exec 9>"$DIR/.lock"
    flock -w "$TIMEOUT" 9 || die "another ceph/cluster.sh holds $DIR/.lock for more than ${TIMEOUT}s"
}

cmd_start() {
    need_binaries
    local t0=$SECONDS
    lock_dir
    if [[ -e $DIR/bootstrap.incomplete ]]; then
        die "an earlier bootstrap of $DIR stopped half-way (see $DIR/log/): run '$0 destroy', then start again"
    fi
    if [[ ! -e $CONF ]]; then
        bootstrap
    else
        start_daemon "mon.$MON_ID"
        wait_for "the monitor to answer" "mon.$MON_ID" ceph_ mon stat
    fi
    start_daemons "mgr.$MGR_ID" "osd.$OSD_ID"
    wait_for "osd.$OSD_ID to be up" "osd.$OSD_ID" osd_up
    # The pool needs the mon and the OSD only; the mgr (slow to load its Python modules) may
    # still be starting meanwhile.
    finish_bootstrap
    wait_for "mgr.$MGR_ID to be available" "mgr.$MGR_ID" mgr_up
    local deadline=$((SECONDS + TIMEOUT))
    until health_ok; do
        if ((SECONDS >= deadline)); then
            ceph_ health detail >&2 || true
            fail_with_log "osd.$OSD_ID" "cluster not HEALTH_OK after ${TIMEOUT}s (health detail above)"
        fi
        local d
        for d in "${DAEMONS[@]}"; do
            [[ -n $(daemon_pid "$d") ]] || fail_with_log "$d" "$d exited while waiting for HEALTH_OK"
        done
        sleep 1
    done
    log "HEALTH_OK after $((SECONDS - t0)) s; use: eval \"\$($0 env)\""
}

cmd_status() {
    local d pid running=0
    echo "cluster dir: $DIR"
    [[ -e $CONF ]] || {
        echo "not bootstrapped (no $CONF)"
        return 3
    }
    for d in "${DAEMONS[@]}"; do
        pid=$(daemon_pid "$d")
        if [[ -n $pid ]]; then
            running=$((running + 1))
            printf '%-6s running  pid %-8s rss %s KiB\n' "$d" "$pid" "$(awk '/^VmRSS/{print $2}' "/proc/$pid/status")"
        else
            printf '%-6s stopped\n' "$d"
        fi
    done
    if [[ -n $(daemon_pid "mon.$MON_ID") ]]; then
        ceph_ -s || true
        ceph_ df || true
    fi
    ((running == ${#DAEMONS[@]})) || return 3
}

cmd_stop() {
    [[ -d $DIR ]] || {
        log "nothing to stop: $DIR does not exist"
        return 0
    }
    lock_dir
    local d pid i
    # OSD first (it tells the mon it goes down when the mon still runs), then mgr, then mon.
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[i]}
        pid=$(daemon_pid "$d")
        [[ -n $pid ]] || continue
        kill -TERM "$pid" 2>/dev/null || true
        local t=0
        while kill -0 "$pid" 2>/dev/null; do
            if ((t++ == 300)); then
                log "$d (pid $pid) still running after 30 s: SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
            sleep 0.1
        done
        rm -f "$(pidfile "$d")"
        log "stopped $d (pid $pid)"
    done
}

cmd_destroy() {
    if [[ -d $DIR ]]; then
        # Refuse to touch something that does not look like our cluster directory.
        local other
        other=$(find "$DIR" -mindepth 1 -maxdepth 1 ! -name .lock -print -quit)
        [[ -e $CONF || -e $DIR/bootstrap.incomplete || -z $other ]] ||
            die "$DIR does not look like a cluster made by this script; not removing it"
    fi
    cmd_stop
    if [[ -d $DIR ]]; then
        rm -rf -- "$DIR"
        log "removed $DIR"
    fi
}

cmd_env() {
    [[ -e $CONF ]] || die "no cluster in $DIR: run '$0 start' first"
    printf 'export SNAPMV_CEPH_DIR=%q\n' "$DIR"
    printf 'export CEPH_CONF=%q\n' "$CONF"
    printf 'export SNAPMV_CEPH_POOL=%q\n' "$POOL"
    printf '# as client.snapmv (rbd profile on pool %s): rbd --id snapmv ... (keyring found through the conf)\n' "$POOL"
}

case ${1:-} in
install) cmd_install ;;
start) cmd_start ;;
status) cmd_status ;;
stop) cmd_stop ;;
destroy) cmd_destroy ;;
env) cmd_env ;;
-h | --help | help) usage ;;
*) usage ;;
esac
