"""Where commands write, checked before anything loads: a folder is a folder (or can be made one), a file has the
suffix of what is written into it, the place is writable and has the room that is known to be needed, and nothing is
replaced without --overwrite, and then only what krona itself wrote there (a folder holding anything else is refused,
naming one such file)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import KronaError
from .paths import expand


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Path, flag: str) -> None:
    """The folder `path` is in (or would be created in) can be written by this user."""
    place = _nearest_existing(path if path.is_dir() else path.parent)
    if not place.is_dir():
        raise KronaError(f"{flag} '{path}' lies under '{place}', which is a file; choose another place")
    try:  # tried, not asked: os.access says yes to root on read-only file systems
        with tempfile.TemporaryFile(dir=place):
            pass
    except OSError as e:
        raise KronaError(
            f"{flag} '{path}' cannot be written: '{place}' is not writable ({e.strerror}); choose another place"
        ) from e


def check_free_space(path: Path, needed: int, flag: str) -> None:
    """At least `needed` bytes free where `path` will be written."""
    free = shutil.disk_usage(_nearest_existing(path)).free
    if free < needed:
        raise KronaError(
            f"{flag} '{path}' needs about {needed / 2**30:.1f} GiB and only {free / 2**30:.1f} GiB is free "
            "there; free some space or choose another place"
        )


def output_folder(path: str | os.PathLike, flag: str, owned: Callable[[Path], bool], overwrite: bool) -> list[Path]:
    """Check a folder a command fills; return krona's own files in it, which the command may replace.

    `owned(file)` tells krona's files (of this command) from others. A folder holding files of krona's is refused
    without `overwrite`; one holding any other file is refused always, naming one of them."""
    path = expand(path)
    if path.exists() and not path.is_dir():
        raise KronaError(f"{flag} '{path}' is a file; give a folder")
    check_writable(path, flag)
    if not path.is_dir():
        return []
    files = sorted(p for p in path.rglob("*") if p.is_file())
    foreign = next((p for p in files if not owned(p)), None)
    if foreign is not None:
        raise KronaError(
            f"{flag} '{path}' holds files krona did not write there (e.g. '{foreign.relative_to(path)}'); "
            "choose an empty or new folder"
        )
    if files and not overwrite:
        raise KronaError(
            f"{flag} '{path}' holds the output of an earlier run; pass --overwrite to replace it, or "
            "choose another folder"
        )
    return files


def output_file(path: str | os.PathLike, flag: str, suffix: str, overwrite: bool) -> Path:
    """Check a file a command writes: its suffix, its folder, and no existing file without `overwrite`."""
    path = expand(path)
    if path.suffix != suffix:
        raise KronaError(
            f"{flag} '{path}' must end in {suffix} (the file is {suffix[1:]}); name it e.g. "
            f"'{path.with_suffix(suffix).name}'"
        )
    if path.is_dir():
        raise KronaError(f"{flag} '{path}' is a folder; give the file's name, e.g. '{path / ('out' + suffix)}'")
    check_writable(path, flag)
    if path.exists() and not overwrite:
        raise KronaError(f"{flag} '{path}' exists; pass --overwrite to replace it, or choose another name")
    return path
