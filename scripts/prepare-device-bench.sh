#!/usr/bin/env bash
# Prepares a run of scripts/bench-fanout.sh on the lent 16-core machine (it has no toolchain): builds stripped
# release binaries of each git ref given (default: HEAD) into .bench/<ref>/ (git-ignored through
# .git/info/exclude), so that one `device run` with `carry: [".bench"]` can compare them:
#   for s in .bench/*/; do KEELSON_BIN=$s bash scripts/bench-fanout.sh 5 | tee "$OUT/$(basename $s).txt"; done
# Usage: scripts/prepare-device-bench.sh [REF...]   e.g.  scripts/prepare-device-bench.sh main direct-writes
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.bench/' .git/info/exclude 2>/dev/null || echo '/.bench/' >> .git/info/exclude
refs=("$@")
[ ${#refs[@]} -gt 0 ] || refs=(HEAD)
for ref in "${refs[@]}"; do
    dir=.bench/$(echo "$ref" | tr '/' '-')
    tree=$(mktemp -d)
    git worktree add -q --detach "$tree" "$ref"
    # Share the build cache: only what differs is rebuilt.
    (cd "$tree" && CARGO_TARGET_DIR="$PWD/../keelson-bench-target" cargo build --release -q \
        -p nvmf-target --bin io-engine --bin nvmf-perf && \
        CARGO_TARGET_DIR="$PWD/../keelson-bench-target" cargo build --release -q -p keelctl)
    mkdir -p "$dir"
    for b in io-engine nvmf-perf keelctl; do strip -o "$dir/$b" "$(dirname "$tree")/keelson-bench-target/release/$b"; done
    git worktree remove --force "$tree"
    echo "$dir: $(du -sh "$dir" | cut -f1) ($(git rev-parse --short "$ref"))"
done
