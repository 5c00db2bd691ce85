#!/usr/bin/env bash
# Set up .venv if needed, lint (ruff: rules and formatting, settings in pyproject.toml), then run the test suite
# (offline, CPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
python -m ruff check .
python -m ruff format --check .
python -m pytest "$@"
