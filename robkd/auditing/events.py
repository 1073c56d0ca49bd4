"""How an audit's progress events are shown, and the ``--time-limit`` check that rides on them.

The stages report through ``on_event(kind, info)`` (:data:`robkd.auditing.stages.EventFn`, whose comment
lists the kinds and fields); :class:`EventDisplay` turns them into tasks of a
:func:`robkd.utils.progress.progress_bar` (a rich bar on a terminal, timestamped lines elsewhere), and
:class:`TimeLimit` stops the run at the first ``checkpoint`` event after its deadline.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from robkd.errors import RobkdError

EventFn = Callable[[str, dict[str, Any]], None]


def phase_label(info: dict[str, Any], prefix: str = "audit") -> str:
    """``audit: student pgd-20 eps=0.1`` from an event's ``model``, ``stage`` (or ``attack``) and ``radius``."""
    from robkd.types import format_radius

    stage = info.get("stage") or info.get("attack") or ""
    words = [w for w in (str(info.get("model") or ""), str(stage)) if w]
    r = info.get("radius")
    if r is not None:
        words.append(f"eps={format_radius(float(r))}")
    return f"{prefix}: " + " ".join(words)


class EventDisplay:
    """Audit events as progress tasks, one open task per running phase (phases may nest: a ``start`` inside
    a running phase opens a second task, ``done`` closes the innermost one)."""

    def __init__(self, progress: Any, prefix: str = "audit") -> None:
        self.progress = progress
        self.prefix = prefix
        self.stack: list[tuple[Any, Any, bool]] = []  # (task id, key, opened by a "progress" event)

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        if kind == "progress":
            key = (info.get("model"), info.get("stage") or info.get("attack"), info.get("radius"))
            if not self.stack or self.stack[-1][1] != key:
                if self.stack and self.stack[-1][2]:
                    self._close()
                empty = not int(info.get("total") or 0)  # the cascade left this attack nothing to attack
                label = phase_label(info, self.prefix) + ("  (no sample left to attack)" if empty else "")
                task = self.progress.add_task(label, total=None if empty else int(info["total"]), rate="",
                                              unit=None if empty else "samples")
                self.stack.append((task, key, True))
            from robkd.utils.progress import rate_text

            total = int(info.get("total") or 0)
            if not total:
                return
            done = int(info.get("done", 0))
            secs = float(info.get("seconds", 0.0))
            self.progress.update(self.stack[-1][0], completed=done if total else 1, rate=rate_text(done, secs),
                                 elapsed=secs)
        elif kind == "start":
            if self.stack and self.stack[-1][2]:
                self._close()
            total = info.get("total")
            task = self.progress.add_task(phase_label(info, self.prefix), total=int(total) if total else None, rate="",
                                          unit=str(info.get("unit") or "samples"))
            self.stack.append((task, None, False))
        elif kind == "advance" and self.stack:
            self.progress.update(self.stack[-1][0], advance=int(info.get("n", 0)))
        elif kind == "done":
            while self.stack and self.stack[-1][2]:  # attack tasks left open inside the phase
                self._close()
            if self.stack:
                self._close()

    def _close(self) -> None:
        task = self.stack.pop()[0]
        self.progress.remove_task(task)

    def finish(self) -> None:
        """Close every open task."""
        while self.stack:
            self._close()


# ----------------------------------------------------------------------------- --time-limit
class TimeLimitReached(RobkdError):
    """The run's ``--time-limit`` passed; the work finished so far is saved (exit 2: an environment condition)."""

    def __init__(self, limit_s: float, elapsed_s: float) -> None:
        from robkd.utils.progress import format_duration

        super().__init__(f"time limit {format_duration(limit_s)} reached after {format_duration(elapsed_s)}")
        self.limit_s = limit_s
        self.elapsed_s = elapsed_s


class TimeLimit:
    """Wraps an event function: ``limit_s`` seconds after ``start`` (a ``clock()`` reading; default: now), the
    next ``checkpoint`` event (sent right after the stages saved their work) raises :class:`TimeLimitReached`."""

    def __init__(self, limit_s: float, inner: EventFn | None = None, *, start: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit_s = float(limit_s)
        self.inner = inner
        self.clock = clock
        self.t0 = clock() if start is None else float(start)

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        if self.inner is not None:
            self.inner(kind, info)
        if kind == "checkpoint":
            elapsed = self.clock() - self.t0
            if elapsed >= self.limit_s:
                raise TimeLimitReached(self.limit_s, elapsed)


def parse_duration(text: "str | float | int", what: str = "--time-limit") -> float:
    """Seconds from ``90m``, ``2h``, ``3600s``, ``45`` (seconds) or ``1h30m``; > 0 (:class:`UsageError` otherwise)."""
    import math
    import re

    from robkd.errors import UsageError

    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = re.fullmatch(r"((?:\d+(?:\.\d*)?|\.\d+)[hms]?)+", s) and re.findall(r"(\d+(?:\.\d*)?|\.\d+)([hms]?)", s)
        if not parts or (len(parts) > 1 and any(unit == "" for _, unit in parts)):
            raise UsageError(f"{what} {text!r} is not a duration: use e.g. 90m, 2h, 3600s, 1h30m or 45 (seconds)")
        value = sum(float(num) * {"h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}[unit] for num, unit in parts)
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"{what} must be a positive duration, got {text!r}")
    return value
