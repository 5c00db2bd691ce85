#!/usr/bin/env bash
# Shared set-up for scripts/test.sh and scripts/demo.sh: a .venv with torch 2.13.0 (CPU wheel) installed before
# anything else, then exactly the packages of requirements/lock.txt (hash-checked), then krona itself. Idempotent:
# reinstalls only when pyproject.toml or the lock changed. Source it from the repository root: `. scripts/setup.sh`.
# On a platform other than the lock's (its header says which), krona's ranges in pyproject.toml are installed instead.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
# Python caches the bytecode of what krona imports (torch, diffusers, transformers) after its first use, whatever the
# environment says: without the cache every krona process compiles them from source again (`krona plan` 18 s, not 1 s).
unset PYTHONDONTWRITEBYTECODE
lock=requirements/lock.txt
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv"
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.krona-installed
want="$(cat pyproject.toml "$lock" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! .venv/bin/python -c "import krona_cli" 2>/dev/null; then
    # torch first and pinned: an unpinned torch pulls a multi-GB CUDA build on these machines. --no-compile: Python
    # compiles the modules krona imports on first use, not every file of torch, transformers and diffusers up front.
    pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-compile)
    echo "installing torch==2.13.0, then the locked packages and krona (a minute or two the first time)"
    "${pip[@]}" "torch==2.13.0"
    if .venv/bin/python scripts/lock_file.py platform "$lock"; then
        "${pip[@]}" --require-hashes --no-deps -r "$lock"
        extras="$(.venv/bin/python scripts/lock_file.py extras "$lock")"
        if [ -n "$extras" ]; then  # left by an earlier lock: the environment is the lock's, nothing more
            .venv/bin/python -m pip uninstall --quiet --yes $extras
        fi
        "${pip[@]}" --no-deps -e .
        .venv/bin/python scripts/lock_file.py check "$lock" >/dev/null || {
            .venv/bin/python scripts/lock_file.py check "$lock"
            echo "error: .venv differs from $lock (above); remove .venv and run this again" >&2
            exit 1
        }
    else
        echo "warning: $lock is for $(grep '^# platform:' "$lock" | cut -d' ' -f3); installing pyproject.toml's ranges" >&2
        "${pip[@]}" -e ".[dev]"
    fi
    echo "$want" > "$stamp"
fi
export HF_HUB_OFFLINE=1
export PATH="$PWD/.venv/bin:$PATH"
