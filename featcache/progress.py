"""A rich progress bar with images/s and ETA, shared by featcache and maskfer."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TaskProgressColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class _Rate(ProgressColumn):
    def render(self, task):
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} img/s" if speed else "-- img/s", style="progress.data.speed")


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True, console: Console | None = None):
    """Yields ``advance(n, **fields)``; a no-op when disabled (tests, --quiet)."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    # The description and fields hold user strings (dataset names like "ferplus:train", paths): shown
    # verbatim, never parsed as rich markup ("[b]") or emoji codes (":train:").
    cols = [
        TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), _Rate(), TextColumn("{task.fields[extra]}", markup=False), TimeElapsedColumn(),
        TextColumn("ETA"), TimeRemainingColumn(),
    ]
    with Progress(*cols, console=console or Console(stderr=True, emoji=False, markup=False),
                  speed_estimate_period=30) as prog:
        task = prog.add_task(description, total=total, extra="")

        def advance(n: int = 1, **fields):
            extra = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
            prog.update(task, advance=n, **({"extra": extra} if fields else {}))

        yield advance
