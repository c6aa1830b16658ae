#!/usr/bin/env bash
# Medplum peers, idempotently, under ${MEDAGENT_PEERS:-<repo>/.peers}:
# - the real @medplum/core client (pushToAgent) for the HTTP compatibility tests;
# - the real @medplum/cli (`medplum agent status|ping|push|reload-config`), tests/test_medplum_cli.py;
# - Medplum's own agent (v5.0.10, bundled for node; not on npm) copied from shared/reference,
#   and the OS `ping` it runs for x-application/ping (its Docker image installs iputils-ping),
#   tests/test_medplum_agent.py.
# Versions: @medplum/core and @medplum/cli 5.x need node >= 22.18; Debian 12 and this machine
# have node 20, so we take the newest 4.x of both (cli 4.3.x: engines ^20.19.0).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PEERS="${MEDAGENT_PEERS:-$REPO/.peers}"
mkdir -p "$PEERS/node"
need_apt=()
command -v node >/dev/null 2>&1 || need_apt+=(nodejs npm)
command -v ping >/dev/null 2>&1 || need_apt+=(iputils-ping)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${need_apt[@]}" >/dev/null
fi
cd "$PEERS/node"
[ -f package.json ] || npm init -y >/dev/null
if [ ! -d node_modules/@medplum/core ] || [ ! -d node_modules/@medplum/cli ]; then
  npm install --no-audit --no-fund --silent @medplum/core@4 @medplum/cli@4 >/dev/null
fi
for m in core cli; do
  node -e "console.log('@medplum/$m', require('./node_modules/@medplum/$m/package.json').version)"
done

# Medplum's agent: shared/ lies beside the repository in CI (and under /work on developer
# machines); MEDAGENT_MEDPLUM_AGENT may name the folder explicitly.
dest="$PEERS/medplum-agent"
if [ ! -f "$dest/agent.cjs" ]; then
  for src in "${MEDAGENT_MEDPLUM_AGENT:-}" "$REPO/../shared/reference/peers/medplum-agent" \
             "$REPO/../../shared/reference/peers/medplum-agent" \
             /work/shared/reference/peers/medplum-agent; do
    if [ -n "$src" ] && [ -f "$src/agent.cjs" ]; then
      mkdir -p "$dest"
      cp "$src/agent.cjs" "$src/loopback-listen.cjs" "$dest/"
      break
    fi
  done
fi
if [ -f "$dest/agent.cjs" ]; then
  echo "medplum agent: $dest/agent.cjs"
else
  echo "medplum agent bundle not found (shared/reference/peers/medplum-agent)" >&2
fi
