#!/usr/bin/env bash
# Install the DICOM peers used by tests/test_dicom_* and bench/dicom_bench.py:
# dcmtk (storescp, storescu, echoscu, findscu, wlmscpfs, dump2dcm), Orthanc (+ worklist plugin)
# and dicom3tools (dciodvfy).  Idempotent: does nothing when everything is already there.
set -euo pipefail

need=()
command -v storescp >/dev/null 2>&1 && command -v wlmscpfs >/dev/null 2>&1 || need+=(dcmtk)
command -v Orthanc >/dev/null 2>&1 || need+=(orthanc)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)

if [ "${#need[@]}" -gt 0 ]; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -q
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "${need[@]}"
fi

# The Orthanc package may start a system daemon on hosts with a working init; the tests run
# their own Orthanc on free ports, so a system one is harmless but not needed.
echo "dicom peers: $(command -v storescp) $(command -v Orthanc) $(command -v dciodvfy)"
