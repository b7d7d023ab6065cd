#!/usr/bin/env bash
# Runs every check and test of Keelson: formatting, clippy, unit, integration and end-to-end tests (the e2e tests
# boot a QEMU VM and create network namespaces, so this needs root).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all -- --check
cargo fmt --all --manifest-path nvmf-target/fuzz/Cargo.toml -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
./scripts/check-chart.sh
KEELSON_REQUIRE_PRIVILEGED=1 cargo test --workspace
# The control-plane scale benchmark, small, so that it keeps working (scripts/bench-scale.sh runs it at scale).
cargo test -q -p ha-agent --bench scale -- --nodes 20 --volumes 60 --faults 5 --agent "$PWD/target/debug/cluster-agent"
# A short fuzz run of each target from the seeds (scripts/fuzz.sh runs them for longer).
./scripts/fuzz.sh 15
