#!/usr/bin/env bash
# The whole snapmv test suite, the way CI runs it (`.ci/run` calls exactly this).
#
#   ./tests/run.sh
#
# On a Debian 12 machine with Rust installed, as root (or with sudo), without questions:
#   1. qemu/setup.sh installs what the QEMU guest tests need and is missing (qemu-system-x86,
#      busybox-static, cpio) and unpacks a Debian cloud kernel into qemu/cache/;
#      ceph/cluster.sh install adds Ceph and librbd for the RBD tests (which start and this
#      script stops a single-node test cluster, docs/ceph.md);
#   2. cargo fmt --check, cargo clippy --workspace --all-targets -D warnings;
#   3. builds the binaries (debug), among them the `snapmv` the end-to-end tests start;
#   4. runs every test: unit, integration (blkio client, vhost protocol, RPC, CLI), QEMU guest
#      end-to-end, crash tests — with `cargo nextest run --profile ci` (cargo test if
#      cargo-nextest is absent) — then the doc tests.
#
# Knobs (environment):
#   SNAPMV_MODEL_OPS=N      operations of the engine's model-based test (CI default is bounded)
#   SNAPMV_CRASH_ROUNDS=N   crash/recovery rounds of the crash tests (CI default is bounded)
#   SNAPMV_SKIP_SETUP=1     do not run qemu/setup.sh or ceph/cluster.sh install (no root
#                           needed); QEMU and RBD tests then skip loudly if what they need is
#                           missing, or fail under CI=true
#   SNAPMV_E2E_ECHO=1       echo the QEMU guests' consoles on stderr
#   CARGO_TARGET_DIR        honoured as usual
#   CI=true                 missing QEMU or Ceph is a failure instead of a skip
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$(date +%s)

step() { printf '\n==> %s  [%ss]\n' "$*" "$(($(date +%s) - started))"; }
die() {
    printf 'tests/run.sh: error: %s\n' "$*" >&2
    exit 1
}

command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust (https://rustup.rs) first"

if [ "${SNAPMV_SKIP_SETUP:-0}" != 1 ]; then
    step "qemu/setup.sh: system packages and the guest kernel (installs only what is missing)"
    if ! ./qemu/setup.sh; then
        case "${CI:-}" in
        "" | 0 | false) echo "tests/run.sh: WARNING: qemu/setup.sh failed; the QEMU tests will skip" >&2 ;;
        *) die "qemu/setup.sh failed (CI is set: the QEMU tests need it)" ;;
        esac
    fi
fi

if [ "${SNAPMV_SKIP_SETUP:-0}" != 1 ]; then
    step "ceph/cluster.sh install: Ceph and librbd for the RBD tests (installs only what is missing)"
    if ! ./ceph/cluster.sh install; then
        case "${CI:-}" in
        "" | 0 | false) echo "tests/run.sh: WARNING: ceph/cluster.sh install failed; the RBD tests will skip" >&2 ;;
        *) die "ceph/cluster.sh install failed (CI is set: the RBD tests need it)" ;;
        esac
    fi
fi
if [ "${SNAPMV_SKIP_SETUP:-0}" != 1 ] && ! command -v systemd-analyze >/dev/null 2>&1; then
    # tests/systemd.rs verifies contrib/systemd/snapmv.service; a container image may lack it.
    step "apt-get install systemd (for systemd-analyze)"
    if [ "$(id -u)" -eq 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null; } ||
            echo "tests/run.sh: WARNING: could not install systemd" >&2
    fi
fi
case "${CI:-}" in
"" | 0 | false) ;;
# Under CI a missing Ceph or a build without librbd fails the RBD tests instead of skipping them.
*) export SNAPMV_RBD_TESTS=1 ;;
esac
# The RBD tests start a test cluster of their own (crates/storage-rbd/tests/common): stop it
# when the run ends, whatever the outcome.
ceph_dir="${SNAPMV_RBD_CEPH_DIR:-/tmp/snapmv-ceph-storage-rbd}"
stop_ceph() {
    if [ -d "$ceph_dir" ]; then
        SNAPMV_CEPH_DIR="$ceph_dir" ./ceph/cluster.sh stop >/dev/null 2>&1 || true
    fi
}
trap stop_ceph EXIT

# rustfmt and clippy come with rustup's default profile; add them if this toolchain lacks them.
for comp in rustfmt clippy; do
    if ! cargo "${comp/rustfmt/fmt}" --version >/dev/null 2>&1; then
        command -v rustup >/dev/null 2>&1 || die "cargo $comp missing and no rustup to add it"
        step "rustup component add $comp"
        rustup component add "$comp"
    fi
done

step "cargo fmt --all --check"
cargo fmt --all --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo build --workspace --bins (debug; the e2e tests start target/debug/snapmv)"
cargo build --workspace --bins
target_dir="$(cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
[ -n "$target_dir" ] || die "cannot tell cargo's target directory"
export SNAPMV_BIN="$target_dir/debug/snapmv"
[ -x "$SNAPMV_BIN" ] || die "$SNAPMV_BIN was not built"

if cargo nextest --version >/dev/null 2>&1; then
    step "cargo nextest run --workspace --profile ci"
    cargo nextest run --workspace --profile ci
    step "cargo test --workspace --doc"
    cargo test --workspace --doc
else
    echo "cargo-nextest not found; falling back to cargo test"
    step "cargo test --workspace"
    cargo test --workspace
fi

step "all tests passed in $(($(date +%s) - started)) s"
