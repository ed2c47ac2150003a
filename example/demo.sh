#!/usr/bin/env bash
# Replays the original five-peer demo of P2PTXTFileSharing on one machine:
# p1..p4 serve, p5 lists everything, downloads hello_world.txt from p1 and lorem_ipsum.txt from
# p2, p3 and p4 together (showing each one's share), then serves both itself.
# Needs only the Rust toolchain. Every server it starts is stopped on any exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

echo "== building qnode (release)"
cargo build --release --quiet --manifest-path "$here/../Cargo.toml"
# The binary cargo built, wherever its target folder is (CARGO_TARGET_DIR, a config file).
target_dir="$(cargo metadata --format-version 1 --no-deps --manifest-path "$here/../Cargo.toml" |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
qnode="${target_dir:-$here/../target}/release/qnode"
export QNODE_ROOT="$here"
unset RUST_LOG QNODE_PEER

pids=()
cleanup() {
    local status=$?
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n== %s\n' "$*"; }
# Shows a command the way the seed's client would have typed it, then runs it.
run() { printf '$ qnode %s\n' "$*"; "$qnode" "$@"; }

# Replayable: forget what p5 downloaded last time.
rm -f p5/served_files/hello_world.txt p5/served_files/lorem_ipsum.txt

step "init: a key pair and a pinned certificate for every peer (kept if they exist)"
for p in p1 p2 p3 p4 p5; do "$qnode" --peer "$p" init; done

step "starting p1..p4 (logs in example/p*.log)"
for p in p1 p2 p3 p4; do
    "$qnode" --peer "$p" serve 2>"$p.log" &
    pids+=("$!")
done

# Ready means answering: ASKER asks until every given server lists (no fixed sleeps).
wait_ready() {
    local asker=$1
    shift
    local deadline=$((SECONDS + 30))
    until "$qnode" --peer "$asker" list "$@" >/dev/null 2>&1; do
        if ((SECONDS > deadline)); then
            echo "demo: servers $* did not become ready; see example/p*.log" >&2
            return 1
        fi
        sleep 0.2
    done
}
wait_ready p5 p1 p2 p3 p4

step "p5: #FILELIST p1 p2 p3 p4"
run --peer p5 list p1 p2 p3 p4

step "p5: #DOWNLOAD hello_world.txt p1"
run --peer p5 download hello_world.txt p1

step "p5: #DOWNLOAD lorem_ipsum.txt p2 p3 p4   (the three collaborate; each one's share below)"
run --peer p5 download lorem_ipsum.txt p2 p3 p4

step "checking the results byte for byte"
cmp p1/served_files/hello_world.txt p5/served_files/hello_world.txt
cmp p2/served_files/lorem_ipsum.txt p5/served_files/lorem_ipsum.txt
ls -a p5/served_files | grep -q '\.part$' && { echo "demo: a temporary file was left behind" >&2; exit 1; }
echo "ok: both files are identical to the originals, and nothing half-written is left"

step "p5 now serves what it downloaded; p1 asks it through the seed-style shell"
"$qnode" --peer p5 serve 2>p5.log &
pids+=("$!")
wait_ready p1 p5
printf '$ qnode --peer p1 shell   <<< "#FILELIST p5"\n'
printf '#FILELIST p5\n' | "$qnode" --peer p1 shell

step "done; stopping the servers"
