"""One krona command at a time per output: a lock file beside the output (`.<name>.krona-lock`) holds the pid, host,
command and start time of the process that writes it. A second command for the same output stops at once; a lock
left by a process that is gone (killed on this host) is taken over, and the caller says so.

Created with O_EXCL, so two processes never both create it; a stale lock is first renamed away (only one process's
rename succeeds), so two processes never both take it over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path

from .errors import KronaError
from .paths import expand


def lock_path(output: str | os.PathLike) -> Path:
    output = expand(output).absolute()
    return output.parent / f".{output.name}.krona-lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class OutputLock:
    """`with OutputLock(output, "krona train") as lock:` holds the output's lock; `lock.took_over` is the stale lock's
    record (pid, host, command, started) when one was taken over, else None."""

    def __init__(self, output: str | os.PathLike, command: str, flag: str = "--output-dir"):
        self.output, self.command, self.flag = Path(output), command, flag
        self.path = lock_path(output)
        self.took_over: dict | None = None
        self._held = False

    def __enter__(self) -> OutputLock:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "argv": sys.argv[1:],
        }
        for _ in range(2):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as e:
                raise KronaError(
                    f"{self.flag} '{self.output}' cannot be written ({e.strerror}: {e.filename}); choose another place"
                ) from e
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            self._held = True
            return self
        raise self._busy(_read(self.path))

    def _take_over_if_stale(self) -> None:
        """Rename a lock whose process is gone out of the way (then the next O_EXCL create wins), else raise."""
        other = _read(self.path)
        if other is None or other.get("host") != socket.gethostname() or _alive(int(other.get("pid", -1))):
            if other is not None or self.path.exists():
                raise self._busy(other)
            return
        retired = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex}")
        try:
            self.path.rename(retired)
        except FileNotFoundError:  # another process took it over first
            return
        retired.unlink(missing_ok=True)
        self.took_over = other

    def _busy(self, other: dict | None) -> KronaError:
        who = (
            "another krona command"
            if other is None
            else (
                f"`{other.get('command')}` (pid {other.get('pid')} on {other.get('host')}, "
                f"since {other.get('started')})"
            )
        )
        return KronaError(
            f"{self.flag} '{self.output}' is in use by {who}; wait for it to finish or choose another {self.flag} "
            f"(if that process is gone for sure, delete {self.path})"
        )

    def __exit__(self, *exc) -> bool:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False
        return False
