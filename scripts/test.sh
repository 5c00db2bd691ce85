#!/usr/bin/env bash
# Set up .venv if needed and run the test suite (offline, CPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
python -m pytest "$@"
