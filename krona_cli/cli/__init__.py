"""The `krona` command line: parse, call one library function, print. Only this package prints.

One module per concern: `app` (the typer app, consoles, what commands share), `help` (the help format), `quiet` (the
libraries' chatter), `render` (tables, progress bars, the training reporter), `errors` (the entry point: failures
as one line and an exit code), and the commands by group: `models`, `adapters`, `sample`, `train`, `evaluate`."""

# isort: off
# each registers its commands with the app, in the order of `krona --help`
from . import train, sample, adapters, evaluate, models  # noqa: F401

# isort: on
from .app import app
from .errors import main

__all__ = ["app", "main"]
