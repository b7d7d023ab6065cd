#!/usr/bin/env bash
# Sets up and runs Keelson on this machine as a local cluster: a cluster agent on its embedded store and three
# io-engines ("node-1" to "node-3" on 127.0.0.1, .2 and .3), each with a pool on a sparse 4 GiB file under
# $KEELSON_DATA (default /var/lib/keelson); then, through the cluster API, a 1 GiB volume with three replicas (one per
# node), published to this host. Prints `keelctl get nodes`, `keelctl get volumes` and the `nvme connect` line.
# Everything is kept under $KEELSON_DATA, so a restart finds the same volume with its data. Ctrl-C stops it all.
#
# Cluster API: 127.0.0.1:10200 (keelctl's default). Engine APIs: 127.0.0.N:10124. NVMe/TCP: 127.0.0.N:4420.
# Metrics: http://127.0.0.N:9502/metrics (engines), http://127.0.0.1:9500/metrics (the agent).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo (Rust >= 1.89) is required" >&2; exit 1; }
# protox compiles etcd-client's .proto files in place of a system protoc (scripts/protoc).
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v protox >/dev/null || cargo install protox --locked --features bin
cargo build --release --bins

data=${KEELSON_DATA:-/var/lib/keelson}
mkdir -p "$data"
bin=./target/release
keelctl=$bin/keelctl
volume=00000000-0000-4000-8000-000000000001
host=$(cat /etc/nvme/hostnqn 2>/dev/null || echo "nqn.2026-11.io.keelson:host-$(hostname)")

pids=()
stop() {
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
}
trap stop EXIT
trap 'exit 0' INT TERM

$bin/cluster-agent --data-dir "$data/agent" --grpc 127.0.0.1:10200 --metrics 127.0.0.1:9500 2>>"$data/agent.log" &
pids+=($!)
for i in 1 2 3; do
    [ -e "$data/pool$i.img" ] || truncate -s 4G "$data/pool$i.img"
    $bin/io-engine --node-name "node-$i" --listen "127.0.0.$i:4420" --grpc "127.0.0.$i:10124" \
        --metrics "127.0.0.$i:9502" --cntlid-range "$((i * 1000))-$((i * 1000 + 999))" \
        --pool "pool$i=$data/pool$i.img" --cluster-agent http://127.0.0.1:10200 2>>"$data/node-$i.log" &
    pids+=($!)
done

echo "waiting for the three nodes to register (logs in $data/*.log)..."
for _ in $(seq 300); do
    online=$($keelctl get -o json nodes 2>/dev/null | grep -c '"state":"Online"' || true)
    [ "$online" = 3 ] && break
    sleep 0.1
done
[ "$online" = 3 ] || { echo "the nodes did not come up; see $data/*.log" >&2; exit 1; }

$keelctl volume create $volume 1GiB --replicas 3 >/dev/null
$keelctl volume publish $volume "$host" --node node-1 | tail -1 >"$data/connect.txt"
$keelctl get nodes
echo
$keelctl get volumes
echo
echo "connect: $(cat "$data/connect.txt")"
echo "metrics: curl http://127.0.0.1:9502/metrics (engine), http://127.0.0.1:9500/metrics (agent)"
wait "${pids[@]}"
