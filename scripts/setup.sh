#!/usr/bin/env bash
# Installs what building and testing cplink needs on a fresh Debian machine.
# The Rust toolchain (cargo, rustfmt, clippy) must already be installed.
set -euo pipefail

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || need_apt+=(python3-venv)
# The benchmark's baseline: OpenSSH's reverse dynamic forward, run as its own sshd -i and ssh.
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to apt-get install ${need_apt[*]}" >&2
        exit 1
    fi
    # Packages must not start services (openssh-server would start an sshd on port 22):
    # invoke-rc.d asks policy-rc.d, and 101 means "not allowed".
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}"
fi

for tool in cargo rustfmt cargo-clippy; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "setup: $tool not found; install the Rust toolchain (rustup) first" >&2
        exit 1
    fi
done
# The Helm chart tests use the real Helm engine from PyPI (helm-python-sdk), pinned in
# tests/helm/requirements.txt, in a virtualenv outside the repository.
VENV="${CPLINK_CACHE:-$HOME/.cache/cplink}/venv"
REQUIREMENTS="$(dirname "$0")/../tests/helm/requirements.txt"
mkdir -p "$(dirname "$VENV")"
# One setup at a time rebuilds the shared environment (say `make demo` beside `make test`).
exec 9>"$VENV.lock"
flock 9
if ! cmp -s "$REQUIREMENTS" "$VENV/requirements.txt" 2>/dev/null; then
    echo "setup: installing the Python test environment in $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    cp "$REQUIREMENTS" "$VENV/requirements.txt"
fi
exec 9>&-
echo "setup: ok"
