"""requirements/lock.txt: write it from pinned versions and their files, or check an environment against it.

    python scripts/lock_file.py write PINS FILES_DIR LOCK   # PINS: `name==version` lines; FILES_DIR: their files
    python scripts/lock_file.py check LOCK                  # this interpreter's packages against LOCK; exit 1 if
                                                            # they differ (the differences, one a line)
    python scripts/lock_file.py extras LOCK                 # installed packages LOCK does not name, one a line

The lock is pip's own hash-checking format (`pip install --require-hashes --no-deps -r requirements/lock.txt`). Its
header names the platform it was made on: the hashes are of the files pip takes there."""

from __future__ import annotations

import hashlib
import platform
import re
import sys
from importlib import metadata
from pathlib import Path

# Installed beside the lock and not pinned by it: torch (setup.sh installs torch==2.13.0 first), krona itself, and
# the venv's own installers.
UNPINNED = {"torch", "krona-cli", "pip", "setuptools", "wheel"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def platform_tag() -> str:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"{sys.implementation.name}{version}-{sys.platform}-{platform.machine()}"


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def lock_platform(path: Path) -> str | None:
    match = re.search(r"^# platform: (\S+)", path.read_text(), re.M)
    return match[1] if match else None


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}


def write(pins: Path, files: Path, lock: Path) -> None:
    hashes: dict[str, list[str]] = {}
    for file in sorted(files.iterdir()):
        name = canonical(re.split(r"-\d", file.name, maxsplit=1)[0])
        hashes.setdefault(name, []).append(hashlib.sha256(file.read_bytes()).hexdigest())
    lines = [
        "# The exact packages of krona's CPU test environment, installed by scripts/setup.sh with",
        "#   pip install --require-hashes --no-deps -r requirements/lock.txt",
        "# after torch==2.13.0. Made by scripts/lock.sh (do not edit by hand); pyproject.toml keeps the ranges.",
        f"# platform: {platform_tag()}",
    ]
    for name, version in sorted(read_lock(pins).items()):
        if name not in hashes:
            raise SystemExit(f"no downloaded file for {name}=={version} in {files}")
        lines.append(f"{name}=={version} \\")
        lines += [f"    --hash=sha256:{h} \\" for h in hashes[name][:-1]] + [f"    --hash=sha256:{hashes[name][-1]}"]
    lock.write_text("\n".join(lines) + "\n")


def differences(lock: Path) -> list[str]:
    want, have = read_lock(lock), installed()
    out = [f"missing {n}=={v}" for n, v in sorted(want.items()) if n not in have]
    out += [
        f"{n} {have[n]} installed, the lock says {v}" for n, v in sorted(want.items()) if n in have and have[n] != v
    ]
    out += [f"not in the lock: {n}=={v}" for n, v in sorted(have.items()) if n not in want and n not in UNPINNED]
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["write"] and len(argv) == 4:
        write(Path(argv[1]), Path(argv[2]), Path(argv[3]))
        return 0
    if argv[:1] == ["check"] and len(argv) == 2:
        found = differences(Path(argv[1]))
        print("\n".join(found) if found else f"the environment is exactly {argv[1]}")
        return 1 if found else 0
    if argv[:1] == ["extras"] and len(argv) == 2:
        want = read_lock(Path(argv[1]))
        print("\n".join(n for n in sorted(installed()) if n not in want and n not in UNPINNED))
        return 0
    if argv[:1] == ["platform"] and len(argv) == 2:  # exit 0 when this interpreter is the lock's platform
        return 0 if lock_platform(Path(argv[1])) == platform_tag() else 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
