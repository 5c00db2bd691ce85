"""Stop requests: SIGINT (Ctrl-C) and SIGTERM alike, answered within one sampler step or training step.

The CLI holds `handling(command)` around every command (main thread only; the previous handlers come back after).
Outside step-wise work a request stops the command at once: `StopRequest` is raised where the program stands (while
a model loads nothing has been written, and every `with` block unwinds, the output's lock included). Inside
`deferred()` (class images, sample grids, validation, the training loop, a study) a request only sets a flag, and
the work calls `check()` at every sampler step and training step: the `StopRequest` raised there is turned into a
`Stopped` error by the code that knows what was kept, whose message names it and the command that continues.
`immediate()` inside deferred work (loading a model) stops at once again. A second Ctrl-C stops at once
(KeyboardInterrupt), whatever is in progress.

A leaf: imports nothing of krona's but `errors`; never prints.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import threading
from collections.abc import Iterator, Sequence

from .errors import KronaError

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
IMMEDIATE, DEFERRED, HELD = "immediate", "deferred", "held"  # how a request is answered where the program stands


class Stopped(KronaError):
    """A stop request answered: the message says what was kept and the command that continues. Exit code 130."""

    exit_code = 130


class StopRequest(BaseException):
    """A stop request, raised where it is answered, for the code that knows what was kept to turn into `Stopped`.

    Not an Exception, so that library code catching every Exception (diffusers' loaders, fallbacks) lets it through.
    `during`: what the program was doing when it stopped at once (e.g. "while loading the base model"), else None."""

    def __init__(self, during: str | None = None):
        super().__init__(signal_name())
        self.during = during

    def unanswered(self) -> str:
        """The message of a request no code turned into `Stopped`: one that stopped the command at once."""
        stopped = f"stopped by {signal_name()} " + (
            f"{self.during}; nothing was written" if self.during else "before it finished; nothing half-written is left"
        )
        return f"{stopped}; run the same command again: {rerun()}"


class _State:
    def __init__(self):
        self.installed = False  # whether `handling` holds the handlers
        self.pending: int | None = None  # the signal of the request not answered yet
        self.modes: list[tuple[str, str | None]] = []  # (IMMEDIATE | DEFERRED | HELD, what is done), innermost last
        self.command: list[str] | None = None  # the command line, when the CLI runs


_state = _State()


def _mode() -> tuple[str, str | None]:
    return _state.modes[-1] if _state.modes else (IMMEDIATE, None)


def _handle(signum, frame) -> None:
    if _state.pending is not None:
        if signum == signal.SIGINT:  # a second Ctrl-C: at once, whatever is in progress
            raise KeyboardInterrupt
        return
    _state.pending = signum
    mode, during = _mode()
    if mode == IMMEDIATE:
        raise StopRequest(during)


@contextlib.contextmanager
def handling(command: Sequence[str] | None = None) -> Iterator[None]:
    """Answer SIGINT and SIGTERM as this module says while inside (in the main thread; elsewhere nothing changes).
    `command`: the command line as given (`krona train ...`), for the messages that say how to continue."""
    if _state.installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    _state.installed, _state.pending, _state.modes = True, None, []
    _state.command = None if command is None else list(command)
    try:
        for sig in _SIGNALS:
            signal.signal(sig, _handle)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        _state.installed, _state.pending, _state.modes, _state.command = False, None, [], None


@contextlib.contextmanager
def _mode_of(mode: str, during: str | None = None) -> Iterator[None]:
    _state.modes.append((mode, during))
    try:
        yield
    finally:
        _state.modes.pop()


@contextlib.contextmanager
def deferred(checks: bool = True) -> Iterator[None]:
    """Step-wise work: a request only sets a flag, answered by `check()` (a no-op with `checks` False: in a
    multi-process run, where the processes agree on a step to stop at instead). Holds the handlers itself where
    nothing does (krona called as a library, in the main thread)."""
    with handling(), _mode_of(DEFERRED if checks else HELD):
        yield


@contextlib.contextmanager
def immediate(during: str) -> Iterator[None]:
    """Work that writes nothing (loading a model), inside deferred work: a request stops it at once, and one already
    made stops it on entry. `during` says what it does ("while loading the base model")."""
    with _mode_of(IMMEDIATE, during):
        if _state.installed and _state.pending is not None:
            raise StopRequest(during)
        yield


def requested() -> bool:
    """Whether a stop was requested and not answered yet."""
    return _state.pending is not None


def check() -> None:
    """Answer a pending request here: raise StopRequest (not where checks are held)."""
    if _state.pending is not None and _mode()[0] != HELD:
        raise StopRequest(_mode()[1])


def signal_name() -> str:
    """The pending request's signal (SIGINT, SIGTERM), or "a stop request" (another process's, in a multi-process
    run)."""
    return signal.Signals(_state.pending).name if _state.pending is not None else "a stop request"


def rerun(*flags: str) -> str:
    """The command that runs the stopped one again, with `flags` added where missing: `krona ...` as given on the
    command line, or "the same command" when krona runs as a library."""
    if _state.command is None:
        return "the same command" + (f" with {' '.join(flags)}" if flags else "")
    return shlex.join(["krona", *_state.command, *(f for f in flags if f not in _state.command)])
