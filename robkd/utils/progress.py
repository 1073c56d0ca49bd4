"""Progress of long-running work (never bare ``print``): a rich bar on a terminal, plain lines elsewhere.

Three modes (:func:`progress_mode`):

* ``bar``: stderr is a terminal: a transient rich bar with a rate, the elapsed time and an ETA; log records
  are printed through the bar's console while it is live, so they never glue to the bar;
* ``lines``: stderr is not a terminal (CI, a pipe, a file): plain timestamped lines on stderr, one when a
  task starts, at most one every ``ROBKD_PROGRESS_INTERVAL`` seconds (default 10) while it runs, and one
  when it ends, e.g. ``[22:14:05] audit: student pgd-20 eps=0.1  640/1000 (64%)  12.3 samples/s  ETA 0:00:29``;
* ``off``: ``ROBKD_NO_PROGRESS`` is set, or the CLI runs with ``--quiet`` (:func:`set_quiet`).

:func:`progress_bar` gives an object with the part of :class:`rich.progress.Progress` that robkd uses
(``add_task``, ``update``, ``remove_task``; ``update(..., elapsed=SECONDS)`` gives the task's own clock, for
work that began before its first update); nested calls share the display that is already live.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from typing import Any, Iterator, TextIO

ENV_OFF = "ROBKD_NO_PROGRESS"
ENV_INTERVAL = "ROBKD_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0

_state: dict[str, Any] = {"quiet": False, "active": None}


def set_quiet(quiet: bool) -> None:
    """``--quiet``: no progress at all (the CLI sets it for each command)."""
    _state["quiet"] = bool(quiet)


def progress_mode() -> str:
    """``off`` (``ROBKD_NO_PROGRESS`` set, or quiet), ``bar`` (stderr is a terminal) or ``lines``."""
    if os.environ.get(ENV_OFF) or _state["quiet"]:
        return "off"
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        tty = False
    return "bar" if tty else "lines"


def progress_enabled() -> bool:
    """Whether progress is shown at all (as a bar or as lines)."""
    return progress_mode() != "off"


def line_interval() -> float:
    """Seconds between two lines of one task (``ROBKD_PROGRESS_INTERVAL``; default 10; an unusable value
    is ignored)."""
    raw = os.environ.get(ENV_INTERVAL)
    if raw:
        try:
            value = float(raw)
        except ValueError:
            return DEFAULT_INTERVAL
        if math.isfinite(value) and value >= 0:
            return value
    return DEFAULT_INTERVAL


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (``0:00:29``); ``-:--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def rate_text(done: float, seconds: float, unit: str = "samples") -> str:
    """``'123.4 samples/s'``; empty before any time has elapsed."""
    if seconds <= 0:
        return ""
    return f"{done / seconds:,.1f} {unit}/s"


def progress_line(description: str, done: float, total: float | None, seconds: float, unit: str = "samples",
                  *, start: float = 0.0, rate_shown: str | None = None) -> str:
    """One progress line without its time stamp: ``desc  640/1000 (64%)  12.3 samples/s  ETA 0:00:29``
    (``start``: units already done when the task began, e.g. resumed work, left out of the rate and ETA;
    ``rate_shown``: the caller's own rate text, shown instead of ``done/seconds``)."""
    parts = [description]
    count = f"{int(done)}/{int(total)}" if total else f"{int(done)}"
    if total:
        count += f" ({100.0 * done / total:.0f}%)"
    parts.append(count)
    rate = (done - start) / seconds if seconds > 0 else 0.0
    if rate_shown:
        parts.append(rate_shown)
    if rate > 0:
        if not rate_shown:
            parts.append(f"{rate:,.1f} {unit}/s")
        if total:
            parts.append(f"ETA {format_duration(max(total - done, 0) / rate)}")
    return "  ".join(parts)


class LineProgress:
    """The part of :class:`rich.progress.Progress` robkd uses, written as plain timestamped lines.

    A line when a task is added, at most one per ``interval`` seconds per task while it advances, and one
    when it finishes (completed reaches total, ``visible=False`` or :meth:`remove_task`).
    """

    def __init__(self, stream: TextIO | None = None, *, interval: float | None = None, rate_unit: str = "samples",
                 clock: Any = time.monotonic) -> None:
        self.stream = stream
        self.interval = line_interval() if interval is None else float(interval)
        self.rate_unit = rate_unit
        self.clock = clock
        self.tasks: dict[int, dict[str, Any]] = {}
        self._next = 0

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        for task_id in list(self.tasks):
            self.remove_task(task_id)

    def _write(self, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        try:
            stream.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
            stream.flush()
        except (OSError, ValueError):  # a closed stream: progress is never worth a failure
            pass

    def add_task(self, description: str, total: float | None = None, completed: float = 0, visible: bool = True,
                 **fields: Any) -> int:
        """Start a task (one line: its description and size)."""
        task_id = self._next
        self._next += 1
        now = self.clock()
        self.tasks[task_id] = {"description": description, "total": total, "completed": float(completed),
                               "start_done": float(completed), "t0": now, "last": now, "finished": False,
                               "unit": fields.get("unit") or self.rate_unit, "rate": ""}
        if visible:  # the count's unit only when the caller names it (a trainer counts batches, rates images)
            size = (f"{int(total)} {fields['unit']}" if fields.get("unit") else f"{int(total)} to do") if total else ""
            done = f", {int(completed)} done before" if completed else ""
            self._write(f"{description}  started" + (f" ({size}{done})" if size else ""))
        return task_id

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, visible: bool | None = None,
               refresh: bool = False, **fields: Any) -> None:
        """Advance a task; a line when the interval has passed since the task's last line, or when it ends."""
        t = self.tasks.get(task_id)
        if t is None or t["finished"]:
            return
        if total is not None:
            t["total"] = total
        if description is not None:
            t["description"] = description
        if completed is not None:
            t["completed"] = float(completed)
        if advance is not None:
            t["completed"] += float(advance)
        if fields.get("rate"):
            t["rate"] = str(fields["rate"])
        if fields.get("elapsed") is not None:  # the caller's own clock (work that began before the first update)
            t["elapsed"] = float(fields["elapsed"])
        if visible is False or (t["total"] and t["completed"] >= t["total"]):
            self._finish(t)
            return
        now = self.clock()
        if now - t["last"] >= self.interval:
            t["last"] = now
            self._write(progress_line(t["description"], t["completed"], t["total"], self._elapsed(t, now), t["unit"],
                                      start=t["start_done"], rate_shown=t["rate"]))

    def remove_task(self, task_id: int) -> None:
        """End a task (its closing line, unless it already finished)."""
        t = self.tasks.pop(task_id, None)
        if t is not None and not t["finished"]:
            self._finish(t)

    @staticmethod
    def _elapsed(t: dict[str, Any], now: float) -> float:
        return max(now - t["t0"], t.get("elapsed") or 0.0)

    def _finish(self, t: dict[str, Any]) -> None:
        t["finished"] = True
        secs = self._elapsed(t, self.clock())
        done = t["completed"]
        count = f"{int(done)}/{int(t['total'])} " if t["total"] else (f"{int(done)} " if done else "")
        rate = t["rate"] or (rate_text(done - t["start_done"], secs, t["unit"]) if done > t["start_done"] else "")
        self._write(f"{t['description']}  {count}done in {format_duration(secs)}" + (f"  {rate}" if rate else ""))


class _NullProgress:
    """No output (progress off)."""

    def __enter__(self) -> "_NullProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> int:
        return 0

    def update(self, *args: Any, **kwargs: Any) -> None:
        return None

    def remove_task(self, *args: Any, **kwargs: Any) -> None:
        return None


class _ConsoleWriter:
    """A text stream that prints whole lines through a rich console (above a live bar)."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.buffer = ""

    def write(self, text: str) -> int:
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        if self.buffer:
            line, self.buffer = self.buffer, ""
            self.console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)


@contextlib.contextmanager
def logs_through(console: Any) -> Iterator[None]:
    """While active, the root logger's handlers that write to stderr print through ``console`` instead."""
    streams = {id(sys.stderr), id(sys.__stderr__)}
    handlers = [h for h in logging.getLogger().handlers
                if type(h) is logging.StreamHandler and id(getattr(h, "stream", None)) in streams]
    writer = _ConsoleWriter(console)
    old = [h.setStream(writer) for h in handlers]  # type: ignore[func-returns-value]
    try:
        yield
    finally:
        for h, stream in zip(handlers, old):
            h.setStream(stream if stream is not None else sys.stderr)
        writer.flush()


def _rich_progress(transient: bool, console: Any = None) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console or Console(stderr=True), transient=transient)


@contextlib.contextmanager
def progress_bar(*, transient: bool = True, rate_unit: str = "samples", mode: str | None = None,
                 console: Any = None) -> Iterator[Any]:
    """A progress display for the current mode (see the module docstring); ``mode``/``console`` override the
    detection (tests). Inside another ``progress_bar`` the live display is shared."""
    active = _state["active"]
    if active is not None:
        yield active
        return
    mode = mode or progress_mode()
    if mode == "off":
        yield _NullProgress()
        return
    if mode == "lines":
        display: Any = LineProgress(rate_unit=rate_unit)
        _state["active"] = display
        try:
            with display:
                yield display
        finally:
            _state["active"] = None
        return
    display = _rich_progress(transient, console)
    _state["active"] = display
    try:
        with logs_through(display.console), display:  # the handlers are found before the bar redirects stderr
            yield display
    finally:
        _state["active"] = None


@contextlib.contextmanager
def progress_task(description: str, total: int | None = None, unit: str = "samples") -> Iterator[Any]:
    """One task of the current display for a block of work; yields ``advance(n)``. The task ends with the
    block (its closing line in ``lines`` mode says how long it took)."""
    with progress_bar(rate_unit=unit) as bar:
        task = bar.add_task(description, total=total, rate="", unit=unit)

        def advance(n: int = 1) -> None:
            bar.update(task, advance=n)

        try:
            yield advance
        finally:
            bar.remove_task(task)
