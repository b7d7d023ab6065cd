#!/usr/bin/env bash
# Sets up and runs Keelson on this machine. For now: one io-engine serving a 1 GiB memory volume over NVMe/TCP on
# 127.0.0.1:4420 (discovery on :4420 and :8009) with its engine API on 127.0.0.1:10124. Ctrl-C stops it.
# Environment: KEELSON_EXPORT, KEELSON_LISTEN, KEELSON_GRPC override the defaults (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo (Rust >= 1.85) is required" >&2; exit 1; }
cargo build --release --bins
export KEELSON_LISTEN=${KEELSON_LISTEN:-127.0.0.1:4420,127.0.0.1:8009}
export KEELSON_EXPORT=${KEELSON_EXPORT:-nqn=nqn.2026-11.io.keelson:vol-00000000-0000-4000-8000-000000000001,memory=1GiB}
echo "keelctl: ./target/release/keelctl engine subsystems"
exec ./target/release/io-engine "$@"
