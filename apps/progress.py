"""The one progress bar of the command line (track, eval davis, eval retrieval, index build, demo).

rich is imported when a bar is made, not with this module, so ``densekit --help`` stays light.
"""

from __future__ import annotations

from typing import Any


def progress_bar(rate: bool = True, console: Any = None) -> Any:
    """A rich ``Progress``: description, bar, done/total, (with ``rate``: the task's ``rate`` field), ETA.

    With ``rate``, every task must be added with a ``rate=`` field (e.g. ``rate=""``) and updated with it.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *([TextColumn("{task.fields[rate]}")] if rate else []),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
