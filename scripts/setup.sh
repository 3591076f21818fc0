#!/usr/bin/env bash
# One idempotent setup step: every Debian package the project needs, a virtual
# environment with the Python dependencies, and /usr/local/bin/testbed.
# Used by `make demo`, `make test`, .ci/run and the Vagrantfile alike.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
# The virtual environment: .venv in the checkout, or TESTBED_VENV (the Vagrant VM keeps
# it outside the synced folder).
VENV=${TESTBED_VENV:-.venv}

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (try: sudo make test)" >&2
    exit 2
fi

DEB_PACKAGES=(
    make iproute2 iputils-ping iptables nftables ipset ipvsadm conntrack kmod procps psmisc
    user-mode-linux uml-utilities dnsmasq-base wrk dnsutils
    python3 python3-venv python3-pip
    vagrant
)
missing=()
for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# A Python >= 3.11 from the distribution (Ubuntu 22.04 ships 3.10: take python3.11 there).
PY=""
for cand in /usr/bin/python3.13 /usr/bin/python3.12 /usr/bin/python3.11 /usr/bin/python3; do
    if [ -x "$cand" ] && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        PY=$cand; break
    fi
done
if [ -z "$PY" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq python3.11 python3.11-venv >/dev/null
    PY=/usr/bin/python3.11
fi
VENV_PKG="python3-venv"
"$PY" -c 'import ensurepip' 2>/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq "python3.$("$PY" -c 'import sys; print(sys.version_info[1])')-venv" >/dev/null || apt-get install -y -qq "$VENV_PKG" >/dev/null
}

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
VENV=$(cd "$VENV" && pwd)
# Reinstall only when pyproject.toml or the checkout's place changed since the last install.
stamp="$VENV/.installed-$( (cat pyproject.toml; echo "$ROOT") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
ln -sf "$VENV/bin/testbed" /usr/local/bin/testbed
echo "setup: ok ($("$VENV/bin/python" --version), venv $VENV, testbed -> /usr/local/bin/testbed)"
