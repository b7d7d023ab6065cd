#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz, libFuzzer) of the NVMe/TCP PDU decoder and of a target connection fed
# arbitrary PDU streams after a valid ICReq/Connect. Seeds: nvmf-target/fuzz/seeds (recorded real exchanges; re-record
# with `cargo run --release --manifest-path nvmf-target/fuzz/Cargo.toml -p nvmf-fuzz-harness --bin record-seeds DIR`).
# The growing corpus lives in $KEELSON_FUZZ_CORPUS (default /var/tmp/keelson-fuzz), crashes in nvmf-target/fuzz/artifacts.
#
#   scripts/fuzz.sh [SECONDS]          each target for SECONDS (default 600), figures at the end
#   scripts/fuzz.sh --runs N           each target for N executions
# Runs on the stable toolchain (no sanitizer: the code is safe Rust; libFuzzer still finds panics, hangs through
# -timeout and unbounded memory through -rss_limit_mb).
set -euo pipefail
cd "$(dirname "$0")/../nvmf-target"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
limit=(-max_total_time="${1:-600}")
if [ "${1:-}" = "--runs" ]; then limit=(-runs="$2"); fi
corpus=${KEELSON_FUZZ_CORPUS:-/var/tmp/keelson-fuzz}
for t in pdu_decoder target_connection; do
    mkdir -p "$corpus/$t"
    echo "[fuzz] $t ${limit[*]}"
    cargo fuzz run -s none -O "$t" "$corpus/$t" "fuzz/seeds/$t" -- "${limit[@]}" -max_len=65536 \
        -rss_limit_mb=2048 -timeout=20 -print_final_stats=1 2>&1 |
        grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|panicked|ERROR|SUMMARY|Test unit written'
done
