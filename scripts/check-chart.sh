#!/usr/bin/env bash
# Checks the Helm chart offline: `helm lint --strict`, then every manifest rendered with the default values and with
# each values file under charts/keelson/ci/ validated against the Kubernetes API schemas (kubernetes-validate,
# --strict: unknown fields are errors) for the oldest and newest Kubernetes the chart supports, and the values
# schema refusing what it must. helm and kubernetes-validate come from scripts/install-deps.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
C=charts/keelson
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# The embedded store (the default) needs the agent pinned to a node: the defaults plus that.
PIN=(--set 'clusterAgent.nodeSelector.kubernetes\.io/hostname=n1')
helm lint --strict "$C" "${PIN[@]}"
render() { # name, helm args...
    local n=$1
    shift
    helm template keelson "$C" --namespace keelson "$@" > "$OUT/$n.yaml"
    for k in 1.30.0 1.34.0; do
        kubernetes-validate -k "$k" --strict --quiet "$OUT/$n.yaml"
    done
    echo "chart: $n renders $(grep -c '^kind:' "$OUT/$n.yaml") manifests, valid for Kubernetes 1.30 and 1.34"
}
render default "${PIN[@]}"
# The VolumeSnapshotClass and csi-snapshotter only where the cluster has the snapshot API ("auto"), or when asked for.
! grep -q '^kind: VolumeSnapshotClass\|name: csi-snapshotter' "$OUT/default.yaml" ||
    { echo "chart: snapshots without the snapshot API" >&2; exit 1; }
render snapshots "${PIN[@]}" --api-versions snapshot.storage.k8s.io/v1/VolumeSnapshotClass
[ "$(grep -c '^kind: VolumeSnapshotClass\|name: csi-snapshotter' "$OUT/snapshots.yaml")" = 2 ] ||
    { echo "chart: no VolumeSnapshotClass or csi-snapshotter with the snapshot API" >&2; exit 1; }
for f in "$C"/ci/*.yaml; do
    helm lint --strict "$C" -f "$f" > /dev/null
    render "$(basename "$f" .yaml)" -f "$f"
done
# What the chart must refuse.
refuse() { # why, helm args...
    local why=$1
    shift
    if helm template keelson "$C" "$@" > /dev/null 2>&1; then
        echo "chart: accepted $* ($why)" >&2
        exit 1
    fi
}
refuse "etcd without endpoints" --set store.type=etcd
refuse "the embedded store on an agent pinned to no node"
refuse "several agents on the embedded store" --set clusterAgent.replicas=3
refuse "an unknown store" --set store.type=sqlite
refuse "a pool disk that is not a path" --set 'ioEngine.pools.n1[0].name=p' --set 'ioEngine.pools.n1[0].disk=sdb' "${PIN[@]}"
refuse "an unknown value" --set ioEngine.cores=4 "${PIN[@]}"
refuse "a negative number of I/O threads" --set ioEngine.ioThreads=-1 "${PIN[@]}"
refuse "a negative spin" --set ioEngine.spinMicros=-5 "${PIN[@]}"
refuse "a snapshot class neither on, off nor auto" --set volumeSnapshotClass.enabled=maybe "${PIN[@]}"
refuse "an etcd endpoint over TLS (the agent has no TLS client)" --set store.type=etcd --set 'store.etcd.endpoints[0]=https://e:2379'
# Several agents are spread one per node, and evicted one at a time.
grep -q "kind: PodDisruptionBudget" "$OUT/etcd-values.yaml" && grep -q "requiredDuringSchedulingIgnoredDuringExecution" "$OUT/etcd-values.yaml" ||
    { echo "chart: several agents without anti-affinity or a disruption budget" >&2; exit 1; }
# System priority classes outside kube-system come with the quota that lets clusters limiting them admit the pods.
grep -q "kind: ResourceQuota" "$OUT/default.yaml" ||
    { echo "chart: system priority classes without their ResourceQuota" >&2; exit 1; }
# No StorageClass (the operator makes their own) still installs.
helm template keelson "$C" "${PIN[@]}" --set-json 'storageClasses=[]' > /dev/null
# Every KEELSON_* variable and --flag a container gives one of Keelson's binaries is one that binary reads (a typo
# would be ignored silently): checked against each binary's --help.
BIN=${KEELSON_BIN_DIR:-target/debug}
for b in io-engine cluster-agent node-agent csi-driver; do
    [ -x "$BIN/$b" ] || { echo "chart: $BIN/$b is missing (cargo build --workspace --bins first)" >&2; exit 1; }
    "$BIN/$b" --help > "$OUT/$b.help"
done
python3 - "$OUT" "$OUT"/default.yaml "$OUT"/etcd-values.yaml <<'PY'
import re, sys, yaml
out, files = sys.argv[1], sys.argv[2:]
bins = ["io-engine", "cluster-agent", "node-agent", "csi-driver"]
helps = {b: open(f"{out}/{b}.help").read() for b in bins}
bad = []
for f in files:
    for doc in yaml.safe_load_all(open(f)):
        spec = (doc or {}).get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            words = " ".join(c.get("command", []) + c.get("args", []))
            binary = next((b for b in bins if re.search(rf"(^|[\s/]){b}(\s|$)", words)), None)
            if binary is None:
                continue
            h = helps[binary]
            for e in c.get("env", []):
                n = e["name"]
                if n.startswith(("KEELSON_", "CSI_")) and f"env: {n}=" not in h:
                    bad.append(f"{doc['metadata']['name']}/{c['name']}: {binary} reads no {n}")
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", words):
                if not re.search(rf"{re.escape(flag)}[ =<,\n]", h):
                    bad.append(f"{doc['metadata']['name']}/{c['name']}: {binary} has no {flag}")
if bad:
    print("\n".join(bad), file=sys.stderr)
    sys.exit(1)
PY
echo "chart: every variable and flag given to a Keelson binary is one it reads"
echo "chart: OK"
