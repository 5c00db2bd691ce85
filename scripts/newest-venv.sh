#!/usr/bin/env bash
# Shared by scripts/lock.sh and scripts/drift.sh (source it from the repository root): a scratch venv in $SCRATCH
# (a new temporary folder) with torch==2.13.0 first, then krona with its dev extra at the NEWEST versions that
# pyproject.toml's ranges allow today, not the lock's. Exports VENV.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/krona-newest.XXXXXX")"
VENV="$SCRATCH/venv"
echo "newest versions into a scratch venv: $VENV"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" --upgrade --upgrade-strategy eager -e ".[dev]"
export VENV
