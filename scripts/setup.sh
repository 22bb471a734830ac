#!/usr/bin/env bash
# Installs what building and testing cplink needs on a fresh Debian machine.
# The Rust toolchain (cargo, rustfmt, clippy) must already be installed.
set -euo pipefail

need_apt=()
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to apt-get install ${need_apt[*]}" >&2
        exit 1
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
echo "setup: ok"
