#!/usr/bin/env bash
# HL7 peers for tests/test_hl7_integration.py.  Idempotent.
# python-hl7 (`hl7`) is a runtime dependency, so it is already there; hl7apy is a test-only
# peer (its MLLPServer closes the connection after every message).  Both go into the Python
# that runs the tests: $MEDAGENT_PYTHON, default python3.
set -euo pipefail
PY="${MEDAGENT_PYTHON:-python3}"
if ! "$PY" -c 'import hl7apy.mllp' 2>/dev/null; then
    "$PY" -m pip install --quiet 'hl7apy==1.3.5'
fi
if ! "$PY" -c 'import hl7.mllp' 2>/dev/null; then
    "$PY" -m pip install --quiet 'hl7>=0.4.5'
fi
"$PY" -c 'from importlib.metadata import version as v; print("hl7 peers ready: hl7", v("hl7"), "hl7apy", v("hl7apy"))'
