"""Short, one-line pieces of error messages shared by the loaders (a hostile file never yields a long one)."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name when empty), shortened."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def short_list(items: list[str], limit: int = 12) -> str:
    """``[a, b, ... (n more)]``: at most ``limit`` items, each at most 100 characters."""
    shown = ", ".join(i if len(i) <= 100 else i[:97] + "..." for i in items[:limit])
    return f"[{shown}{', ... (%d more)' % (len(items) - limit) if len(items) > limit else ''}]"
