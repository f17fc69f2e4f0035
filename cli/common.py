"""Shared click helpers: KEY=VALUE parsing and turning library errors into clean exits."""
from __future__ import annotations

import functools
import sys

from rich.console import Console
from rich.markup import escape

# emoji=False: log lines carry user strings, and rich would turn "ferplus:train: ..." into an emoji
# (":train:"). Markup stays on for our own "[bold red]error:[/]" prefixes; user text printed with
# markup goes through rich.markup.escape, or is printed with markup=False.
err_console = Console(stderr=True, soft_wrap=True, emoji=False)


def wide_console() -> Console:
    """Tables stay readable when output is piped (rich assumes 80 columns off a terminal)."""
    c = Console(emoji=False)
    return c if c.is_terminal else Console(width=160, emoji=False)


def friendly_errors(*error_types):
    """Print known errors as one red line and exit 1 (tracebacks are for bugs, not bad input)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            try:
                return fn(*a, **kw)
            except error_types as e:
                err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True)
                sys.exit(1)
            except KeyboardInterrupt:
                err_console.print("[yellow]interrupted[/]: everything already written is kept; rerun to resume")
                sys.exit(130)

        return wrapper

    return deco
