#!/usr/bin/env bash
# Create ./.venv (or $DISTBP_VENV) and install distbp with the given extras, e.g. "mpich,test".
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${DISTBP_VENV:-.venv}
extras=${1:-mpich}
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" 2>/dev/null; then
        # Debian/Ubuntu ship venv separately
        rm -rf "$venv"
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
        python3 -m venv "$venv"
    fi
fi
"$venv/bin/python" -m pip install -q --upgrade pip
# setuptools warns on every editable install that folders named like the package may shadow
# it; that is how an editable install works, so the warning is filtered (only that one)
PYTHONWARNINGS="ignore:Editable installation" "$venv/bin/python" -m pip install -q -e ".[$extras]"
echo "distbp installed in $venv (extras: $extras)"
