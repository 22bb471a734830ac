#!/usr/bin/env bash
# Installs the real Kubernetes control plane and node parts that the end-to-end tests and
# `make demo` run:
#   - etcd 3.4 and kubectl from Debian;
#   - containerd, runc, the CNI plugins (/usr/lib/cni) and a static busybox (a shell for test
#     images) from Debian, installed without starting any service;
#   - kube-apiserver, kube-controller-manager, kube-scheduler and kubelet v1.20.2, built from
#     Debian's `kubernetes` source package with Debian's Go, and a static `pause` built from the
#     same tree, cached under $CPLINK_CACHE (default ~/.cache/cplink) so that later runs skip the
#     build. A cache that lacks some of them builds only those.
# Prints the directory holding the binaries on its last line, and points
# $CPLINK_CACHE/kube-current at it (where the test harness looks).
set -euo pipefail

SOURCE_VERSION="1.20.5+really1.20.2-1.1+deb12u1"
CACHE="${CPLINK_CACHE:-$HOME/.cache/cplink}"
OUT="$CACHE/kube-v1.20.2-${SOURCE_VERSION//+/_}"
GO_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet)

log() { echo "kube.sh: $*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# What the EXIT trap removes: the build directory and a policy-rc.d this script created.
WORK=""
created_policy=""
cleanup() {
    if [ -n "$WORK" ]; then rm -rf "$WORK"; fi
    if [ -n "$created_policy" ]; then as_root rm -f "$created_policy"; fi
}
trap cleanup EXIT

installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

packages=()
command -v etcd >/dev/null 2>&1 || packages+=(etcd-server)
command -v kubectl >/dev/null 2>&1 || packages+=(kubernetes-client)
# What real nodes run: a container runtime, its OCI runtime and the CNI plugins.
command -v containerd >/dev/null 2>&1 || packages+=(containerd)
command -v runc >/dev/null 2>&1 || packages+=(runc)
[ -x /usr/lib/cni/bridge ] || packages+=(containernetworking-plugins)
installed busybox-static || packages+=(busybox-static)

missing=()
for b in "${GO_BINARIES[@]}"; do
    [ -x "$OUT/$b" ] || missing+=("$b")
done
need_pause=false
[ -x "$OUT/pause" ] || need_pause=true
building=false
if ((${#missing[@]})) || $need_pause; then
    building=true
    command -v go >/dev/null 2>&1 || packages+=(golang-go)
    command -v rsync >/dev/null 2>&1 || packages+=(rsync)
    command -v gcc >/dev/null 2>&1 || packages+=(gcc libc6-dev)
    [ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] \
        || packages+=(golang-github-modern-go-reflect2-dev)
fi
if ((${#packages[@]})); then
    log "installing ${packages[*]}"
    # Packages must not start services (containerd's would start a daemon): invoke-rc.d asks
    # policy-rc.d, and 101 means "not allowed". A policy already in place is left alone.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        created_policy="$policy"
        as_root sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod 755 $policy"
    fi
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >&2
fi

if ! $building; then
    ln -sfn "$OUT" "$CACHE/kube-current"
    log "Kubernetes binaries cached in $OUT"
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
cd "$WORK"
log "downloading the kubernetes $SOURCE_VERSION source package"
apt-get source --download-only "kubernetes=$SOURCE_VERSION" >&2
origs=(kubernetes_*.orig.tar.*)
mkdir src
tar xf "${origs[0]}" -C src
tops=(src/*/)
SRC="$WORK/${tops[0]%/}"
cd "$SRC"
mkdir -p "$OUT"

# Each binary lands under a temporary name and is renamed into place, so an interrupted build
# never leaves a truncated binary that a later run would take for a cached one.
install_binary() {
    cp "$1" "$OUT/.$2.tmp"
    mv "$OUT/.$2.tmp" "$OUT/$2"
}

if $need_pause; then
    # The pod sandbox's process, with the flags of build/pause/Makefile (whose REV comes from
    # git, absent from a source package).
    pause_tag="$(sed -n 's/^TAG *?\{0,1\}= *//p' build/pause/Makefile)"
    log "building pause ${pause_tag}"
    gcc -Os -Wall -Werror -static -DVERSION="v${pause_tag}-debian" \
        -o "$WORK/pause" build/pause/linux/pause.c
    install_binary "$WORK/pause" pause
fi

if ((${#missing[@]})); then
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
    what=()
    for b in "${missing[@]}"; do what+=("cmd/$b"); done
    log "building ${missing[*]} (about 10 minutes on 2 cores for all four)"
    make WHAT="${what[*]}" >&2
    for b in "${missing[@]}"; do
        install_binary "_output/bin/$b" "$b"
    done
fi

ln -sfn "$OUT" "$CACHE/kube-current"
log "Kubernetes binaries in $OUT"
echo "$OUT"
