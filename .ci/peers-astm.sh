#!/usr/bin/env bash
# Installs the third-party ASTM peers the ASTM integration tests and bench/astm_bench.py use,
# idempotently, under ${MEDAGENT_PEERS:-<repo>/.peers}:
#   socat (apt)                         virtual null-modem cable (pty pair)
#   $PEERS/venv-labmcp                  labmcp-astm-lis 0.1.3, strict E1381 receiver
#   $PEERS/venv-astm                    python-astm 0.5.0 (2013) with the Py3.10+ import shim
#   $PEERS/astm/                        driver scripts (copied from tests/peers/astm)
# Re-running only redoes what is missing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="${MEDAGENT_PEERS:-$REPO/.peers}"
PY="${PYTHON:-python3}"
mkdir -p "$PEERS/astm"

say() { echo "peers-astm: $*"; }

if ! command -v socat >/dev/null 2>&1; then
    say "installing socat (apt)"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends socat
fi

# The driver scripts and the shim are fixtures of this repo; keep the copy in $PEERS current.
cp -r "$REPO/tests/peers/astm/." "$PEERS/astm/"

if ! "$PEERS/venv-labmcp/bin/python" -c 'import labmcp_astm_lis.driver' >/dev/null 2>&1; then
    say "installing labmcp-astm-lis into $PEERS/venv-labmcp"
    "$PY" -m venv "$PEERS/venv-labmcp"
    "$PEERS/venv-labmcp/bin/pip" install -q --upgrade pip
    "$PEERS/venv-labmcp/bin/pip" install -q 'labmcp-astm-lis==0.1.3'
fi

if ! PYTHONPATH="$PEERS/astm/shim" "$PEERS/venv-astm/bin/python" -c 'import astm.server, astm.client' \
        >/dev/null 2>&1; then
    say "installing python-astm 0.5.0 (with shim) into $PEERS/venv-astm"
    "$PY" -m venv "$PEERS/venv-astm"
    "$PEERS/venv-astm/bin/pip" install -q --upgrade pip
    "$PEERS/venv-astm/bin/pip" install -q wheel setuptools
    # astm 0.5.0's setup.py imports astm/codec.py, which needs collections.Iterable: the shim.
    PYTHONPATH="$PEERS/astm/shim" "$PEERS/venv-astm/bin/pip" install -q --no-build-isolation \
        'astm==0.5.0'
fi

# Check what we installed actually imports.
"$PEERS/venv-labmcp/bin/python" -c 'import labmcp_astm_lis.driver, labmcp.transports'
PYTHONPATH="$PEERS/astm/shim" "$PEERS/venv-astm/bin/python" -c 'import astm.server, astm.client'
command -v socat >/dev/null
say "ok (PEERS=$PEERS)"
