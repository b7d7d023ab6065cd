#!/usr/bin/env bash
# Control-plane scale: one real cluster-agent on a real etcd (Debian package etcd-server) managing simulated
# io-engines (the engine API served from memory, all in one process: ha-agent/benches/scale) and 3-replica volumes.
# Prints the time to register the nodes and to create and publish the volumes, the agent's CPU, RSS and the store's
# size, and the time from a replica fault to its replacement's rebuild start (p50/p99 over the faults).
# Usage: scripts/bench-scale.sh [--nodes 1000] [--volumes 10000] [--faults 100] [--store etcd|embedded]
#                               [--concurrency 32] [--agent-args "--sweep-ms 5000"]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q --bin cluster-agent
exec cargo bench -q -p ha-agent --bench scale -- "$@"
