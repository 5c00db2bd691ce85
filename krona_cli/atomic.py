"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import KronaError
from .paths import expand

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _no_space(path: Path, error: OSError) -> KronaError:
    return KronaError(
        f"no space left on the device while writing '{path}' ({error.strerror}); the previous version, if any, is "
        "intact: free some space and run the command again (a training run continues with --resume latest)"
    )


def _umask() -> int:
    """The process's umask (read by setting it, then putting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Have `write(file)` write `path`'s contents into a temp file in the same folder, then fsync, rename and fsync the
    folder; `write` may stream (a model checkpoint need not be built in memory first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets what open() would give it
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise _no_space(path, e) from e
        raise
    fsync_dir(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `write_atomic`)."""
    return write_atomic(path, lambda f: f.write(data))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened, e.g. on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_folder_atomic(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Have `fill(folder)` write a folder's contents into a temporary sibling, then rename it into `target`.

    An existing `target` is swapped out by two renames (put back if the second fails) and deleted afterwards, so
    `target` always holds either the old folder or the whole new one. The caller decides whether replacing is allowed.
    """
    target = expand(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Siblings, so the renames never cross a filesystem; `mkdir` (not `tempfile.mkdtemp`, which forces mode 0700)
    # gives the finished folder the usual umask permissions.
    staging = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        fill(staging)
        if target.exists():
            target.rename(retired)
            try:
                staging.rename(target)
            except BaseException:
                retired.rename(target)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(target)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            raise _no_space(target, e) from e
        raise
    fsync_dir(target.parent)
    return target
