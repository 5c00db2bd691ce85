#!/usr/bin/env bash
# Find drift on purpose, not by a newcomer: install the newest versions that pyproject.toml allows today in a scratch
# venv (not the lock's), show how they differ from requirements/lock.txt, and run the test suite on them (extra
# arguments go to pytest). Not part of CI. A green run says the lock can be refreshed (scripts/lock.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/newest-venv.sh
trap 'rm -rf "$SCRATCH"' EXIT
"$VENV/bin/python" scripts/lock_file.py check requirements/lock.txt || true
unset PYTHONDONTWRITEBYTECODE
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" PATH="$VENV/bin:$PATH"
"$VENV/bin/python" -m pytest -n auto --dist loadfile -p no:cacheprovider "$@"
