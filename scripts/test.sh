#!/usr/bin/env bash
# Set up .venv if needed, lint (ruff: rules and formatting, settings in pyproject.toml), then run the test suite
# (offline, CPU) in one process per core, each with one torch thread (small models run fastest that way; two torch
# processes with default threads on 2 cores slow each other down many times). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
python -m ruff check .
python -m ruff format --check .
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
python -m pytest -n auto --dist loadfile "$@"
