#!/usr/bin/env bash
# Refresh requirements/lock.txt, the exact versions (and sha256 of each file) that scripts/setup.sh installs: resolve
# pyproject.toml's ranges to the newest versions today in a scratch venv, then pin every package it holds but torch
# (setup.sh installs torch==2.13.0 itself, first) and krona, with the hashes of the files pip takes on this
# platform. Refresh on purpose, then run scripts/test.sh and commit the lock with what it needed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/newest-venv.sh
pins="$SCRATCH/pins.txt"
"$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v -i -E '^(torch|krona-cli)==' > "$pins"
"$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps -d "$SCRATCH/files" -r "$pins"
"$VENV/bin/python" scripts/lock_file.py write "$pins" "$SCRATCH/files" requirements/lock.txt
rm -rf "$SCRATCH"
echo "requirements/lock.txt: $(grep -c '==' requirements/lock.txt) packages pinned"
