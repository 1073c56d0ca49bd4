"""Short, one-line pieces of error messages shared by the loaders (a hostile file never yields a long one)."""

from __future__ import annotations

import re


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name when empty), shortened."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def short_list(items: list[str], limit: int = 12) -> str:
    """``[a, b, ... (n more)]``: at most ``limit`` items, each at most 100 characters."""
    shown = ", ".join(i if len(i) <= 100 else i[:97] + "..." for i in items[:limit])
    return f"[{shown}{', ... (%d more)' % (len(items) - limit) if len(items) > limit else ''}]"


def cause_line(exc: BaseException, limit: int = 300) -> str:
    """The line of an exception's message that says what went wrong: for an error raised inside a TorchScript
    or exported program (whose first line is only "The following operation failed ..." and whose middle is a
    traceback), its last ``SomethingError: ...`` line; otherwise :func:`first_line`."""
    text = str(exc)
    if "TorchScript" in text.split("\n", 1)[0]:
        causes = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[A-Za-z_.]*(Error|Exception): ", ln)]
        if causes:
            line = causes[-1]
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return first_line(exc, limit)
