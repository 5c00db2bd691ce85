"""Paths as a shell reads them: a leading `~` or `~user` is that home folder where it is known, and a `~name` of no
known user stays as written (a folder of that name), as shells leave it, where `Path.expanduser` raises RuntimeError."""

from __future__ import annotations

from pathlib import Path


def expand(path: str | Path) -> Path:
    """`path` with its home folder expanded where it is known."""
    path = Path(path)
    try:
        return path.expanduser()
    except RuntimeError:
        return path
