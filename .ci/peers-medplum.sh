#!/usr/bin/env bash
# The real @medplum/core client (pushToAgent) for the HTTP compatibility tests.
set -euo pipefail
PEERS="${MEDAGENT_PEERS:-$(cd "$(dirname "$0")/.." && pwd)/.peers}"
mkdir -p "$PEERS/node"
cd "$PEERS/node"
if ! command -v node >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm
fi
[ -f package.json ] || npm init -y >/dev/null
if [ ! -d node_modules/@medplum/core ]; then
  # 4.x runs on Node 20; 5.x needs Node >= 22.
  npm install --no-audit --no-fund --silent @medplum/core@4 >/dev/null
fi
node -e "console.log('@medplum/core', JSON.parse(require('fs').readFileSync('node_modules/@medplum/core/package.json')).version)"
