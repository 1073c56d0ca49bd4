"""The one home of small input validators: integers, numbers, texts and comma-separated lists.

Every check raises a :class:`~robkd.errors.UsageError` (or the ``error`` class given) naming the option,
so bad input is one line and exit 2 wherever it comes from (flags, spec files, the Python API).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Sequence

from robkd.errors import UsageError


def _bound_text(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum:g} to {maximum:g}"
    if minimum is not None:
        return f" >= {minimum:g}"
    if maximum is not None:
        return f" <= {maximum:g}"
    return ""


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None, *,
              parse_text: bool = False, error: type[Exception] = UsageError) -> int:
    """``value`` as an int (bools refused; integral numpy/torch scalars accepted; with ``parse_text`` a
    decimal string too) within ``[minimum, maximum]``."""
    v = value
    if parse_text and isinstance(v, str) and v.strip().lstrip("+-").isdigit():
        v = int(v.strip())
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise error(f"{name} must be an integer{_bound_text(minimum, maximum)}, got {value!r}")
    v = int(v)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise error(f"{name} must be an integer{_bound_text(minimum, maximum)}, got {v}")
    return v


def check_number(value: Any, name: str, minimum: float | None = None, maximum: float | None = None, *,
                 error: type[Exception] = UsageError) -> float:
    """``value`` as a finite float (bools refused) within ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise error(f"{name} must be a finite number{_bound_text(minimum, maximum)}, got {value!r}")
    v = float(value)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        raise error(f"{name} must be a finite number{_bound_text(minimum, maximum)}, got {v!r}")
    return v


def check_text(value: Any, name: str) -> str:
    """A non-empty string (a path is accepted as its text), stripped."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{name} must be a non-empty string, got {value!r}")
    return value.strip()


def split_list(value: Any, name: str, *, split_commas: bool = True, allow_empty: bool = False) -> list[str]:
    """Items of a comma-separated string or of a list of strings (each item split at commas too), stripped;
    an empty item is refused unless ``allow_empty`` (then it is dropped)."""
    def parts(text: str) -> list[str]:
        return [p.strip() for p in text.split(",")] if split_commas else [text.strip()]

    if isinstance(value, str):
        items = parts(value)
    elif isinstance(value, (list, tuple)):
        items = []
        for item in value:
            if not isinstance(item, str):
                raise UsageError(f"{name} must be a list of strings, got {item!r}")
            items += parts(item)
    else:
        raise UsageError(f"{name} must be a string or a list of strings, got {value!r}")
    if allow_empty:
        return [i for i in items if i]
    if any(not i for i in items):
        raise UsageError(f"empty entry in {name}: {value!r}")
    return items


def parse_floats(value: Any, name: str, *, separators: str = ",") -> list[float]:
    """Finite numbers from a list, a single number, or text split at any of ``separators``."""
    if isinstance(value, str):
        text = value
        for sep in separators[1:]:
            text = text.replace(sep, separators[0])
        items: Sequence[Any] = [p for p in text.split(separators[0]) if p.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    try:
        out = [float(p) for p in items if not isinstance(p, bool)]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"bad {name} {value!r}: expected comma-separated numbers") from exc
    if len(out) != len(items) or not out or any(not math.isfinite(x) for x in out):
        raise UsageError(f"bad {name} {value!r}: expected finite numbers")
    return out


def parse_shape(value: Any, name: str = "input_shape (--input-shape)") -> tuple[int, int, int]:
    """Three positive integers C,H,W from ``"3,32,32"``, ``"3x32x32"`` or a sequence."""
    vals = parse_floats(value, name, separators=",x")
    if len(vals) != 3 or any(v <= 0 or v != int(v) for v in vals):
        raise UsageError(f"{name} must be three positive integers C,H,W, got {value!r}")
    return int(vals[0]), int(vals[1]), int(vals[2])
