#!/usr/bin/env bash
# A real browser for tests/test_console_browser.py: Debian's chromium and its chromedriver
# (/usr/bin/chromedriver; the tests never let selenium download a driver).  selenium itself is
# a test extra in setup.cfg.  Idempotent.
set -euo pipefail
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
echo "browser ready: $(/usr/bin/chromedriver --version | head -n 1)"
