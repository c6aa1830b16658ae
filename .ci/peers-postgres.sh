#!/usr/bin/env bash
# PostgreSQL for tests/test_storage_postgres.py (tests/pgenv.py starts a throwaway cluster from
# these binaries, as an unprivileged user, on a loopback port; nothing is left running).
# Idempotent.  psycopg (the driver) is a runtime dependency in setup.cfg.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends postgresql >/dev/null
    # Debian's package starts its own cluster; the tests do not use it.
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        for conf in /etc/postgresql/*/main; do
            [ -d "$conf" ] || continue
            v=$(basename "$(dirname "$conf")")
            pg_ctlcluster "$v" main stop >/dev/null 2>&1 || true
        done
    fi
fi
ls -d /usr/lib/postgresql/*/bin | tail -n 1 | sed 's/^/postgresql ready: /'
