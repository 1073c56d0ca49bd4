"""Rich progress bars used by long-running library code (never bare ``print``)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator


def progress_enabled() -> bool:
    """Progress bars are shown on a terminal unless ``ROBKD_NO_PROGRESS`` is set."""
    if os.environ.get("ROBKD_NO_PROGRESS"):
        return False
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(*, transient: bool = True, rate_unit: str = "samples") -> Iterator["object"]:
    """A :class:`rich.progress.Progress` with a rate column (``samples/s``).

    Disabled (no output) when stderr is not a terminal or ``ROBKD_NO_PROGRESS`` is set.
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    progress = Progress(
        *columns,
        console=Console(stderr=True),
        transient=transient,
        disable=not progress_enabled(),
    )
    with progress:
        yield progress


def rate_text(done: float, seconds: float, unit: str = "samples") -> str:
    """``'123.4 samples/s'``; empty before any time has elapsed."""
    if seconds <= 0:
        return ""
    return f"{done / seconds:,.1f} {unit}/s"
