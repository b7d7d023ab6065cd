#!/usr/bin/env bash
# Sets up and runs Keelson on this machine: one io-engine with a pool on a sparse file
# ($KEELSON_DATA/pool0.img, default /var/lib/keelson, 4 GiB), a 1 GiB thin replica in it, and a volume (a nexus over
# that replica) published over NVMe/TCP on 127.0.0.1:4420 (discovery also on :8009). Engine API on 127.0.0.1:10124,
# metrics on http://127.0.0.1:9502/metrics. The pool and the replica's data survive a restart. Ctrl-C stops it.
# Environment: KEELSON_DATA, KEELSON_LISTEN, KEELSON_GRPC, KEELSON_METRICS override the defaults (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo (Rust >= 1.89) is required" >&2; exit 1; }
# protox compiles etcd-client's .proto files in place of a system protoc (scripts/protoc).
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v protox >/dev/null || cargo install protox --locked --features bin
cargo build --release --bins

data=${KEELSON_DATA:-/var/lib/keelson}
mkdir -p "$data"
[ -e "$data/pool0.img" ] || truncate -s 4G "$data/pool0.img"
export KEELSON_LISTEN=${KEELSON_LISTEN:-127.0.0.1:4420,127.0.0.1:8009}
export KEELSON_GRPC=${KEELSON_GRPC:-127.0.0.1:10124}
export KEELSON_METRICS=${KEELSON_METRICS:-127.0.0.1:9502}
export KEELSON_ENGINE=http://$KEELSON_GRPC
replica=00000000-0000-4000-8000-0000000000a1
volume=00000000-0000-4000-8000-000000000001

./target/release/io-engine --node-name "$(hostname)" --pool "pool0=$data/pool0.img" "$@" &
engine=$!
trap 'kill -TERM $engine 2>/dev/null; wait $engine' INT TERM
keelctl=./target/release/keelctl
for _ in $(seq 100); do $keelctl engine node >/dev/null 2>&1 && break; sleep 0.1; done
$keelctl engine replica create pool0 $replica 1GiB --share
$keelctl engine create-nexus $volume "local:///nqn.2026-11.io.keelson:replica-$replica" >/dev/null
$keelctl engine publish-nexus $volume --allow-any-host >/dev/null
$keelctl engine nexuses
$keelctl engine pool list
echo "connect: nvme connect -t tcp -a 127.0.0.1 -s 4420 -n nqn.2026-11.io.keelson:vol-$volume"
echo "metrics: curl http://$KEELSON_METRICS/metrics"
wait $engine
