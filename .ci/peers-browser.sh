#!/usr/bin/env bash
# A real browser for tests/test_console_browser*.py: Debian's chromium and its chromedriver
# (/usr/bin/chromedriver; the tests never let selenium download a driver).  selenium itself is
# a test extra in setup.cfg.  And axe-core (Deque's accessibility engine, npm) for
# tests/test_console_a11y.py, under $MEDAGENT_PEERS/axe: the test injects its axe.min.js
# into the browser, nothing is fetched at run time.  Idempotent.
set -euo pipefail
PEERS="${MEDAGENT_PEERS:-$(cd "$(dirname "$0")/.." && pwd)/.peers}"
need_apt=()
[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || need_apt+=(chromium chromium-driver)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ ! -f "$PEERS/axe/node_modules/axe-core/axe.min.js" ]; then
    mkdir -p "$PEERS/axe"
    npm install --prefix "$PEERS/axe" --no-audit --no-fund --silent axe-core@4 >/dev/null
fi
echo "browser ready: $(/usr/bin/chromedriver --version | head -n 1);" \
     "axe-core $(node -p "require('$PEERS/axe/node_modules/axe-core/package.json').version")"
