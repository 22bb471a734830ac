#!/usr/bin/env bash
# Installs the real Kubernetes control plane that the end-to-end tests and `make demo` run:
#   - etcd 3.4 and bubblewrap from Debian;
#   - kube-apiserver, kube-controller-manager and kube-scheduler v1.20.2, built from Debian's
#     `kubernetes` source package with Debian's Go, cached under $CPLINK_CACHE (default
#     ~/.cache/cplink) so that later runs skip the build.
# Prints the directory holding the three binaries on its last line, and points
# $CPLINK_CACHE/kube-current at it (where the test harness looks).
set -euo pipefail

SOURCE_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
CACHE="${CPLINK_CACHE:-$HOME/.cache/cplink}"
OUT="$CACHE/kube-v1.20.2-${SOURCE_VERSION//+/_}"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

log() { echo "kube.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

packages=()
command -v etcd >/dev/null 2>&1 || packages+=(etcd-server)
command -v bwrap >/dev/null 2>&1 || packages+=(bubblewrap)
command -v kubectl >/dev/null 2>&1 || packages+=(kubernetes-client)

have_binaries=true
for b in "${BINARIES[@]}"; do
    [ -x "$OUT/$b" ] || have_binaries=false
done
if ! $have_binaries; then
    command -v go >/dev/null 2>&1 || packages+=(golang-go)
    command -v rsync >/dev/null 2>&1 || packages+=(rsync)
    [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] \
        || packages+=(golang-github-modern-go-reflect2-dev)
fi
if ((${#packages[@]})); then
    log "installing ${packages[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >&2
fi

if $have_binaries; then
    ln -sfn "$OUT" "$CACHE/kube-current"
    log "control plane binaries cached in $OUT"
    echo "$OUT"
    exit 0
fi

# Source packages: mirror every binary-package stanza of the system's Debian sources.
SRC_LIST=/etc/apt/sources.list.d/cplink-deb-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && [ ! -f "$SRC_LIST" ]; then
    log "adding deb-src entries ($SRC_LIST)"
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
        | as_root tee "$SRC_LIST" >/dev/null
    as_root apt-get update -qq
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cplink-kube-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
log "downloading the kubernetes $SOURCE_VERSION source package"
apt-get source --download-only "kubernetes=$SOURCE_VERSION" >&2
origs=(kubernetes_*.orig.tar.*)
mkdir src
tar xf "${origs[0]}" -C src
tops=(src/*/)
SRC="$WORK/${tops[0]%/}"
cd "$SRC"

# kube-apiserver built with Go >= 1.18 against the vendored reflect2 1.0.1 crashes the first
# time it serializes a custom resource; Debian's reflect2 1.0.2 fixes it.
log "replacing vendored reflect2 1.0.1 with Debian's 1.0.2"
rm -rf vendor/github.com/modern-go/reflect2
mkdir -p vendor/github.com/modern-go/reflect2
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
    /usr/share/gocode/src/github.com/modern-go/reflect2/*.s \
    vendor/github.com/modern-go/reflect2/
sed -i 's#\(github.com/modern-go/reflect2\) v1.0.1#\1 v1.0.2#g' go.mod vendor/modules.txt
if grep -q 'modern-go/reflect2 v1.0.1' go.mod vendor/modules.txt; then
    log "could not pin reflect2 1.0.2 in go.mod / vendor/modules.txt"
    exit 1
fi

export GOPATH="$SRC/.go" CGO_ENABLED=0
mkdir -p "$GOPATH/src/k8s.io"
ln -sfn ../../.. "$GOPATH/src/k8s.io/kubernetes"
log "building ${BINARIES[*]} (about 10 minutes on 2 cores)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler" >&2

mkdir -p "$OUT.tmp"
for b in "${BINARIES[@]}"; do
    cp "_output/bin/$b" "$OUT.tmp/$b"
done
rm -rf "$OUT"
mv "$OUT.tmp" "$OUT"
ln -sfn "$OUT" "$CACHE/kube-current"
log "control plane binaries in $OUT"
echo "$OUT"
