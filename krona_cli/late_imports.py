"""Libraries whose import krona holds back until it needs them. diffusers imports bitsandbytes at its own import when
it is installed (1.2 s on these machines), although krona quantizes with it itself and only for an int8/nf4 base or
--optimizer adamw8bit. `hold_back` makes the model libraries read it as absent (`sys.modules` holding None is "not
installed" to their checks); `release` undoes that where krona imports it."""

from __future__ import annotations

import sys

_held: set[str] = set()


def hold_back(name: str, unless_imported: tuple[str, ...] = ()) -> None:
    """Hold `name` back in this process, unless it or one of `unless_imported` is imported already (their checks
    ran)."""
    if not any(module in sys.modules for module in (name, *unless_imported)):
        sys.modules[name] = None
        _held.add(name)


def release(name: str) -> None:
    """Let `name` be imported again, if `hold_back` held it (a None that krona did not put there stays)."""
    if name in _held:
        _held.discard(name)
        if name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]
