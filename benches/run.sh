#!/usr/bin/env bash
# Runs the transfer benchmark with every reference it can use. As root it installs what the
# namespace scenarios need (iproute2 for ip/tc, nftables and ethtool for loss, nginx and aria2 for
# the HTTP reference) from the distribution's packages, and builds sendme from crates.io into
# target/bench-tools; without root those scenarios are skipped with a note.
# Environment: QNODE_BENCH_SIZE, QNODE_BENCH_NS_SIZE, QNODE_BENCH_RUNS, QNODE_BENCH_SKIP_NS (see
# benches/transfer.rs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "$(id -u)" = 0 ] && ! { command -v tc && command -v nft && command -v ethtool && command -v aria2c && command -v nginx; } >/dev/null 2>&1; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables ethtool aria2 nginx-light >/dev/null
fi
# sendme (the iroh-blobs reference) is built once into a cache folder under target/ (not committed).
if [ ! -x target/bench-tools/bin/sendme ]; then
    cargo install sendme --version 0.37.1 --locked --root target/bench-tools
fi
# nginx as packaged may start a default site; the benchmark runs its own instances only.
systemctl stop nginx >/dev/null 2>&1 || service nginx stop >/dev/null 2>&1 || true
cargo bench --bench transfer
