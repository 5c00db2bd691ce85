"""krona's help format: plain text that reads at 80 columns (long flag names on their own line, never cut), options
grouped under their panels, and every default written one way: `[default: X]`."""

from __future__ import annotations

import typer.core


class KronaCommand(typer.core.TyperCommand):
    """A typer command whose --help is krona's format."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                title = getattr(param, "rich_help_panel", None) or (
                    "Arguments" if param.param_type_name == "argument" else "Options"
                )
                sections.setdefault(title, []).append((record[0], help_with_default(param)))
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


def help_with_default(param) -> str:
    """A parameter's help with its default appended as `[default: X]` (switches: on/off; unset values: what they
    mean, from show_default)."""
    text = (param.help or "").strip()
    shown = param.show_default
    if isinstance(shown, str):
        default = shown
    elif (
        shown is False
        or param.default in (None, [], "")
        or getattr(param, "is_flag", False)
        and param.default is False
        and not param.secondary_opts
    ):
        return text
    elif isinstance(param.default, bool):
        default = "on" if param.default else "off"
    else:
        default = ",".join(map(str, param.default)) if isinstance(param.default, (list, tuple)) else str(param.default)
    return f"{text}  [default: {default}]"
