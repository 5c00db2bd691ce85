"""The entry point: runs the app and turns every failure into one line and an exit code (2 bad input, 1 a bug, 130
stopped by Ctrl-C or SIGTERM: `stopping.handling` around every command). `--debug` may stand anywhere on the command
line."""

from __future__ import annotations

import difflib
import sys
import traceback
from typing import Optional

import typer
from rich.markup import escape

from .. import late_imports
from ..errors import KronaError
from ..stopping import Stopped, StopRequest, handling
from .app import app, err_console
from .quiet import quiet_libraries

EXIT_OK, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 130  # bad input exits with KronaError.exit_code, 2
# The base class of typer's usage errors (typer ships its own copy of click, whose classes it does not export).
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def usage_line(e, args: list[str]) -> str:
    """typer's usage error as one line, with the closest flag for an unknown one (and the DreamBooth scripts'
    names of train's settings, e.g. --learning-rate -> --lr)."""
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    option = getattr(e, "option_name", None)
    if option:
        flags = [
            o
            for p in (e.ctx.command.params if e.ctx else [])
            for o in (*p.opts, *p.secondary_opts)
            if not getattr(p, "hidden", False)
        ]
        close = next(iter(difflib.get_close_matches(option, flags, n=1)), None)
        if e.ctx and e.ctx.command.name == "train":  # the DreamBooth scripts' names: --learning-rate is --lr
            from ..training.config import suggestion

            close = f"--{suggestion(option)}" if suggestion(option) else close
        message = f"no such option: {option}" + (f"; did you mean {close}?" if close else "")
    command = " ".join(e.ctx.command_path.split()[1:]) if e.ctx else ""
    return f"{message} (krona {command + ' ' if command else ''}-h lists the options)"


def _print(label: str, message: str) -> None:
    err_console.print(f"{label} {escape(message)}", highlight=False, soft_wrap=True)


def _run(args: list[str]):
    """The command, with SIGINT and SIGTERM answered within a step (`stopping`); a request that stopped it at once
    becomes one line saying so and how to run it again."""
    with handling(args):
        try:
            return app(args=args, prog_name="krona", standalone_mode=False)
        except StopRequest as e:
            raise Stopped(e.unanswered()) from None


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: runs the app and turns failures into one line and an exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    quiet_libraries(debug)  # before any command imports a library
    # until something quantizes (pipeline.quantize.import_bitsandbytes releases it)
    late_imports.hold_back("bitsandbytes", unless_imported=("diffusers", "transformers", "peft"))
    stopped_by_krona = False  # a stopped command that said what it kept: no second line
    try:
        result = _run(args)
        code = result if isinstance(result, int) else EXIT_OK
    except KronaError as e:
        if debug and e.__cause__ is not None:  # the library error krona turned into this line
            traceback.print_exception(e.__cause__)
        _print("[yellow]interrupted:[/]" if e.exit_code == EXIT_INTERRUPTED else "[bold red]error:[/]", str(e))
        code, stopped_by_krona = e.exit_code, e.exit_code == EXIT_INTERRUPTED
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = EXIT_INTERRUPTED
    except _UsageError as e:  # unknown option, missing argument, bad value
        _print("[bold red]error:[/]", usage_line(e, args))
        code = e.exit_code
    except Exception as e:  # a bug: one line, the traceback only with --debug
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        _print("[bold red]internal error:[/]", f"{type(e).__name__}: {e}{hint}")
        code = EXIT_INTERNAL
    if code == EXIT_INTERRUPTED and not stopped_by_krona:  # typer itself turns Ctrl-C into exit code 130
        _print("[yellow]interrupted[/]", "")
    if argv is None:
        sys.exit(code)
    return code
