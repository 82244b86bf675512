#!/usr/bin/python3
"""Checks of the test cluster through librbd's Python binding (python3-rbd), for issue 18.

    rbd_check.py io IMAGE         write 4 KiB at an offset, read it back, take a snapshot, and
                                  show (with the rbd CLI) the exclusive lock and the watcher
                                  while the image is open
    rbd_check.py blocklist IMAGE  hold the exclusive lock, get blocklisted with
                                  `ceph osd blocklist add ADDR`, show what the next write returns,
                                  then show another client taking the lock over
    rbd_check.py takeover IMAGE   a holder process is killed with SIGKILL; another client takes
                                  the lock: once by waiting (librbd breaks a dead owner's lock by
                                  itself after the watch times out) and once at once, by
                                  breaking the lock explicitly (which blocklists the old owner)
    rbd_check.py handover IMAGE   live migration's switch-over: the owner releases the lock,
                                  another client acquires it, the old owner can no longer write

The image lives in $SNAPMV_CEPH_POOL (default snapmv) and is created (64 MiB) if missing.
The cluster is found through $CEPH_CONF (see `ceph/cluster.sh env`). Run with /usr/bin/python3:
python3-rbd is a Debian package, invisible to other Pythons (pyenv, venvs).
Exit status 0 when every check holds.
"""

import errno
import os
import subprocess
import sys
import time

import rados
import rbd

CONF = os.environ.get("CEPH_CONF") or sys.exit('rbd_check.py: set CEPH_CONF (eval "$(ceph/cluster.sh env)")')
POOL = os.environ.get("SNAPMV_CEPH_POOL", "snapmv")


def say(msg):
    print(f"rbd_check: {msg}", flush=True)


def run(*args):
    """Run a CLI command against the cluster, echo it and its output, return the output."""
    cmd = [args[0], "--conf", CONF, *args[1:]]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    print("$ " + " ".join(args))
    print(out.rstrip() or "(no output)", flush=True)
    return out


def connect(name="client.admin"):
    cluster = rados.Rados(conffile=CONF, name=name)
    cluster.connect(timeout=30)
    return cluster


def ensure_image(ioctx, image):
    if image not in rbd.RBD().list(ioctx):
        # Default features of Ceph 16: layering, exclusive-lock, object-map, fast-diff, deep-flatten.
        rbd.RBD().create(ioctx, image, 64 << 20)
        say(f"created {POOL}/{image} (64 MiB)")


def check_io(image):
    cluster = connect()
    ioctx = cluster.open_ioctx(POOL)
    ensure_image(ioctx, image)
    with rbd.Image(ioctx, image) as img:
        features = img.features()
        assert features & rbd.RBD_FEATURE_EXCLUSIVE_LOCK, "exclusive-lock is not enabled by default"
        say(f"features {features:#x}: exclusive-lock enabled")
        offset = 5 * (1 << 20) + 12 * 4096  # 5 MiB + 48 KiB: inside the second 4 MiB object
        data = bytes((i * 7 + 3) % 251 for i in range(4096))
        assert img.write(data, offset) == 4096
        img.flush()
        assert img.read(offset, 4096) == data
        say(f"wrote 4 KiB at offset {offset}, flushed, read it back: equal")
        # The first write took the exclusive lock automatically.
        say(f"is_exclusive_lock_owner: {img.is_exclusive_lock_owner()}")
        owners = img.lock_get_owners()
        say(f"lock_get_owners: {list(owners)}")
        snap = f"check-{int(time.time())}"
        img.create_snap(snap)
        img.write(b"\xff" * 4096, offset)
        with rbd.Image(ioctx, image, snapshot=snap, read_only=True) as old:
            assert old.read(offset, 4096) == data
        assert img.read(offset, 4096) == b"\xff" * 4096
        say(f"snapshot {snap}: keeps the old 4 KiB after an overwrite of the head")
        say(f"this client: {cluster.get_addrs()} (instance {cluster.get_instance_id()})")
        # While the image is open here: the CLI sees our watch and our lock.
        status = run("rbd", "status", f"{POOL}/{image}")
        locks = run("rbd", "lock", "ls", f"{POOL}/{image}")
        assert f"client.{cluster.get_instance_id()}" in status, "rbd status does not show our watcher"
        assert f"client.{cluster.get_instance_id()}" in locks, "rbd lock ls does not show our lock"
        img.remove_snap(snap)
    ioctx.close()
    cluster.shutdown()
    say("io: all checks hold")


def check_blocklist(image):
    cluster = connect()
    ioctx = cluster.open_ioctx(POOL)
    ensure_image(ioctx, image)
    img = rbd.Image(ioctx, image)
    # An explicit acquire (what a store owner would do): librbd then does not hand the lock to
    # another client that asks for it; only breaking it (which blocklists us) takes it away.
    img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
    img.write(b"A" * 4096, 0)
    img.flush()
    addr = cluster.get_addrs()
    say(f"client A {addr} (client.{cluster.get_instance_id()}) holds the exclusive lock and wrote block 0")
    run("rbd", "lock", "ls", f"{POOL}/{image}")

    # A second live client (as a second daemon would) cannot take the lock from A.
    second = connect()
    sctx = second.open_ioctx(POOL)
    with rbd.Image(sctx, image) as b2:
        t0 = time.monotonic()
        try:
            b2.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            say("UNEXPECTED: a second client acquired the lock while A holds it")
            ok_acquire = False
        except rbd.Error as e:
            say(
                f"a second client's lock_acquire while A holds the lock, {time.monotonic() - t0:.2f} s: "
                f"{type(e).__name__} errno={e.errno}: {e}"
            )
            ok_acquire = e.errno == errno.EROFS
    sctx.close()
    second.shutdown()

    # Another client asking for the lock cannot get it while A holds it explicitly.
    try:
        subprocess.run(
            ["rbd", "--conf", CONF, "bench", "--io-type", "write", "--io-total", "4K", f"{POOL}/{image}"],
            check=True,
            capture_output=True,
            text=True,
            timeout=20,
        )
        say("UNEXPECTED: another client wrote while A held the lock")
        ok_other = False
    except subprocess.TimeoutExpired:
        say("another client's write waits for the lock (timed out after 20 s, as expected)")
        ok_other = True
    except subprocess.CalledProcessError as e:
        say(
            f"another client's write failed while A holds the lock (rc {e.returncode}): "
            f"{e.stderr.strip().splitlines()[-1] if e.stderr.strip() else ''}"
        )
        ok_other = True

    run("ceph", "osd", "blocklist", "add", addr)
    t0 = time.monotonic()
    err = None
    try:
        img.write(b"B" * 4096, 4096)
        img.flush()
        result = "write and flush succeeded"
    except rbd.Error as e:
        err = abs(e.errno or 0)
        result = f"{type(e).__name__} errno={err} ({errno.errorcode.get(err, '?')}): {e}"
    say(f"A's next write after the blocklist, {time.monotonic() - t0:.2f} s: {result}")
    blocked = err == errno.ESHUTDOWN

    # B takes over: break A's lock (already fenced) and write.
    run("rbd", "lock", "ls", f"{POOL}/{image}")
    other = connect()
    octx = other.open_ioctx(POOL)
    with rbd.Image(octx, image) as b:
        owners = list(b.lock_get_owners())
        say(f"lock owners seen by B: {owners}")
        for o in owners:
            b.lock_break(rbd.RBD_LOCK_MODE_EXCLUSIVE, o["owner"])
        b.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        b.write(b"C" * 4096, 4096)
        b.flush()
        assert b.read(0, 4096) == b"A" * 4096, "A's acknowledged write is gone"
        assert b.read(4096, 4096) == b"C" * 4096
        say(
            f"client B {other.get_addrs()} broke the lock, acquired it, wrote block 1; "
            "A's acknowledged block 0 is there, A's fenced write is not"
        )
    octx.close()
    other.shutdown()
    try:
        img.close()
    except rbd.Error as e:
        say(f"closing A's image: {type(e).__name__}: {e}")
    try:
        ioctx.close()
        cluster.shutdown()
    except rados.Error as e:
        say(f"shutting A down: {e}")
    run("ceph", "osd", "blocklist", "rm", addr)
    ok = blocked and ok_other and ok_acquire
    say("blocklist: all checks hold" if ok else "blocklist: CHECK FAILED")
    return ok


def hold(image):
    """Child of `takeover`: take the lock, write, print our address, wait to be killed."""
    cluster = connect()
    ioctx = cluster.open_ioctx(POOL)
    img = rbd.Image(ioctx, image)
    img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
    img.write(b"A" * 4096, 0)
    img.flush()
    print(cluster.get_addrs(), flush=True)
    time.sleep(3600)


def check_takeover(image):
    cluster = connect()
    ioctx = cluster.open_ioctx(POOL)
    ensure_image(ioctx, image)
    ok = True
    for explicit in (False, True):
        holder = subprocess.Popen(
            [sys.executable, __file__, "hold", image], stdout=subprocess.PIPE, text=True
        )
        addr = holder.stdout.readline().strip()
        holder.kill()  # SIGKILL: no release, the watch lingers until the OSD times it out
        holder.wait()
        t0 = time.monotonic()
        say(f"holder {addr} took the lock, wrote block 0 and was killed with SIGKILL")
        with rbd.Image(ioctx, image) as b:
            if explicit:
                for o in b.lock_get_owners():
                    b.lock_break(rbd.RBD_LOCK_MODE_EXCLUSIVE, o["owner"])
                say(f"explicit: lock_break of {addr} (blocklists it) took {time.monotonic() - t0:.1f} s")
            b.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            took = time.monotonic() - t0
            b.write(b"B" * 4096, 4096)
            b.flush()
            ok &= b.read(0, 4096) == b"A" * 4096
            say(
                f"{'explicit' if explicit else 'waiting'}: the new client owns the lock {took:.1f} s after the kill"
            )
        bl = subprocess.run(
            ["ceph", "--conf", CONF, "osd", "blocklist", "ls"], check=False, capture_output=True, text=True
        ).stdout
        ok &= addr in bl
        say(f"{addr} is blocklisted: {addr in bl}")
        subprocess.run(
            ["ceph", "--conf", CONF, "osd", "blocklist", "rm", addr], check=False, capture_output=True
        )
    ioctx.close()
    cluster.shutdown()
    say("takeover: all checks hold" if ok else "takeover: CHECK FAILED")
    return ok


def check_handover(image):
    """Live migration's switch-over: A flushes and releases, B acquires; A cannot write again."""
    a_cluster, b_cluster = connect(), connect()
    a_ctx, b_ctx = a_cluster.open_ioctx(POOL), b_cluster.open_ioctx(POOL)
    ensure_image(a_ctx, image)
    ok = True
    with rbd.Image(a_ctx, image) as a, rbd.Image(b_ctx, image) as b:
        a.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        a.write(b"A" * 4096, 0)
        a.flush()
        t0 = time.monotonic()
        a.lock_release()
        b.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
        took = time.monotonic() - t0
        ok &= b.read(0, 4096) == b"A" * 4096
        b.write(b"B" * 4096, 4096)
        b.flush()
        say(f"A released, B acquired in {took:.2f} s and reads A's write; nobody was blocklisted")
        try:
            a.write(b"X" * 4096, 0)
            say("UNEXPECTED: A wrote after handing the lock over")
            ok = False
        except rbd.Error as e:
            say(f"A's write after the handover: {type(e).__name__} errno={e.errno}: {e}")
            ok &= e.errno == errno.EROFS
    for ctx, cl in ((a_ctx, a_cluster), (b_ctx, b_cluster)):
        ctx.close()
        cl.shutdown()
    say("handover: all checks hold" if ok else "handover: CHECK FAILED")
    return ok


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("io", "blocklist", "takeover", "handover", "hold"):
        sys.exit(__doc__)
    mode, image = sys.argv[1:]
    if mode == "io":
        check_io(image)
    elif mode == "hold":
        hold(image)
    elif not {"blocklist": check_blocklist, "takeover": check_takeover, "handover": check_handover}[mode](
        image
    ):
        sys.exit(1)


if __name__ == "__main__":
    main()
