"""Shared enums and small dataclasses: threat models, radii parsing, model metadata and its bounds."""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
import reprlib
from fractions import Fraction
from typing import Any

from robkd.errors import UsageError


class Norm(str, enum.Enum):
    """Threat-model norm of the perturbation ball (RobustBench style)."""

    LINF = "Linf"
    L2 = "L2"

    @classmethod
    def parse(cls, value: "str | Norm") -> "Norm":
        """Parse ``linf``/``Linf``/``inf``/``l2``/``L2`` (case-insensitive)."""
        if isinstance(value, Norm):
            return value
        key = str(value).strip().lower()
        if key in {"linf", "l_inf", "inf", "l-inf"}:
            return cls.LINF
        if key in {"l2", "l_2", "2"}:
            return cls.L2
        raise UsageError(f"unknown norm {value!r}: use 'Linf' or 'L2'")

    @property
    def dual(self) -> float:
        """The exponent p* of the dual norm (1 for Linf, 2 for L2)."""
        return 1.0 if self is Norm.LINF else 2.0


def parse_radius(text: str) -> float:
    """Parse one radius: ``8/255``, ``0.03``, ``1e-3``. Raises :class:`UsageError`."""
    raw = text.strip()
    if not raw:
        raise UsageError("empty radius in --eps list")
    try:
        if "/" in raw:
            value = float(Fraction(raw))
        else:
            value = float(raw)
    except (ValueError, ZeroDivisionError) as exc:
        raise UsageError(f"bad radius {text!r}: use numbers or fractions like 8/255") from exc
    if not math.isfinite(value) or value < 0:
        raise UsageError(f"bad radius {text!r}: must be finite and >= 0")
    return value


def parse_eps_list(text: "str | list[Any] | tuple[Any, ...]") -> list[float]:
    """Parse ``"1/255,2/255,...,8/255"`` (or a list) into sorted unique floats.

    ``a,b,...,z`` expands an arithmetic progression from the step ``b - a``
    up to ``z`` (fractions kept exact), e.g. ``1/255,2/255,...,8/255``.
    """
    if isinstance(text, (list, tuple)):
        parts = [str(p) for p in text]
    else:
        parts = [p for p in str(text).split(",")]
    parts = [p.strip() for p in parts]
    if not parts or all(not p for p in parts):
        raise UsageError("empty --eps list")
    if "..." in parts:
        i = parts.index("...")
        if i < 2 or i != len(parts) - 2 or parts.count("...") != 1:
            raise UsageError(f"bad --eps {text!r}: '...' needs two values before and one after, e.g. 1/255,2/255,...,8/255")
        try:
            a, b, z = (Fraction(parts[i - 2]), Fraction(parts[i - 1]), Fraction(parts[i + 1]))
        except (ValueError, ZeroDivisionError) as exc:
            raise UsageError(f"bad --eps {text!r}: {exc}") from exc
        step = b - a
        if step <= 0 or z < b:
            raise UsageError(f"bad --eps {text!r}: the progression must increase")
        count = int((z - a) / step)
        if count > 10000:
            raise UsageError(f"bad --eps {text!r}: too many radii")
        values = [parse_radius(p) for p in parts[: i - 2]] + [float(a + k * step) for k in range(count + 1)]
        if float(a + count * step) != float(z):
            values.append(float(z))
    else:
        values = [parse_radius(p) for p in parts]
    return sorted(set(values))


def format_radius(eps: float) -> str:
    """Human form of a radius: a short decimal when one is exact (``0.2``, ``0.05``, not ``51/255``), else
    ``8/255`` when it is k/255, else the shortest decimal."""
    if float(f"{eps:.4g}") == eps:
        return f"{eps:g}"
    k = eps * 255
    if eps > 0 and abs(k - round(k)) < 1e-9 and round(k) < 10000:
        return f"{int(round(k))}/255"
    return f"{eps:g}"


@dataclasses.dataclass
class ModelMeta:
    """Metadata carried by every loaded model (timm-style ``pretrained_cfg``).

    ``input_shape`` is ``(C, H, W)``; ``mean``/``std`` are per-channel and are
    applied inside the model, so the model always takes [0,1] pixels.
    """

    arch: str | None = None
    arch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_classes: int | None = None
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dataset: str | None = None
    class_names: list[str] | None = None
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        d["input_shape"] = list(self.input_shape) if self.input_shape else None
        d["mean"] = list(self.mean) if self.mean is not None else None
        d["std"] = list(self.std) if self.std is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelMeta":
        """Inverse of :meth:`to_dict`; unknown keys and values of the wrong type or range are an error
        (:class:`UsageError` naming the field)."""
        if not isinstance(d, dict):
            raise UsageError(f"model metadata must be a mapping, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise UsageError(f"unknown model metadata keys: {sorted(map(str, unknown))[:8]}")
        d = dict(d)
        for k in ("input_shape", "mean", "std"):
            if d.get(k) is not None:
                if not isinstance(d[k], (list, tuple)):
                    raise UsageError(f"model metadata {k} must be a list, got {type(d[k]).__name__}")
                d[k] = tuple(d[k])
        for k in ("arch_kwargs", "provenance", "source"):  # JSON null: the field's empty default
            if k in d and d[k] is None:
                del d[k]
        return cls(**d).validate()

    def validate(self) -> "ModelMeta":
        """Check every field's type and range (see the ``MAX_*`` bounds); returns ``self``.

        Raises :class:`UsageError` naming the field: metadata read from a file can say anything."""
        if self.arch is not None and (not isinstance(self.arch, str) or not self.arch.strip() or len(self.arch) > 300):
            raise UsageError(f"model metadata arch must be a non-empty name, got {short_repr(self.arch)}")
        for name in ("arch_kwargs", "provenance", "source"):
            value = getattr(self, name)
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise UsageError(f"model metadata {name} must be a mapping with string keys, got {short_repr(value)}")
            if nesting_depth(value) > MAX_META_DEPTH:
                raise UsageError(f"model metadata {name} is nested more than {MAX_META_DEPTH} levels deep")
        if self.num_classes is not None:
            self.num_classes = check_num_classes(self.num_classes, "model metadata num_classes")
        if self.input_shape is not None:
            self.input_shape = check_input_shape(self.input_shape, "model metadata input_shape")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            if not 1 <= len(value) <= MAX_CHANNELS or not all(_is_number(v) and math.isfinite(v) for v in value):
                raise UsageError(f"model metadata {name} must be 1 to {MAX_CHANNELS} finite numbers, got {short_repr(value)}")
            setattr(self, name, tuple(float(v) for v in value))
        if self.std is not None and min(self.std) <= 0:
            raise UsageError(f"model metadata std must be > 0, got {short_repr(self.std)}")
        if self.dataset is not None and not isinstance(self.dataset, str):
            raise UsageError(f"model metadata dataset must be a name, got {short_repr(self.dataset)}")
        if self.class_names is not None:
            names = self.class_names
            if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
                raise UsageError(f"model metadata class_names must be a list of strings, got {short_repr(names)}")
            if self.num_classes is not None and len(names) != self.num_classes:
                raise UsageError(f"model metadata has {len(names)} class_names but num_classes = {self.num_classes}")
            self.class_names = list(names)
        return self


MAX_CLASSES = 1_000_000
"""Most classes a model may declare."""
MAX_CHANNELS = 4096
"""Most input channels (and mean/std entries)."""
MAX_INPUT_ELEMENTS = 2**26
"""Most values in one input image (C*H*W; 3x4096x4096 fits)."""
MAX_META_DEPTH = 32
"""Deepest nesting of model metadata mappings (provenance, arch_kwargs)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 3, 6, 6, 6
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def short_repr(value: Any) -> str:
    """A bounded ``repr`` for error messages: safe on values nested arbitrarily deep, huge or odd."""
    try:
        return _SHORT.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int too long to print
        return f"<{type(value).__name__}>"



def check_num_classes(value: Any, what: str = "num_classes") -> int:
    """``value`` as a number of classes in ``[1, MAX_CLASSES]``; :class:`UsageError` otherwise."""
    if not _is_int(value) or not 1 <= value <= MAX_CLASSES:
        raise UsageError(f"{what} must be an integer from 1 to {MAX_CLASSES:,}, got {short_repr(value)}")
    return int(value)


def check_input_shape(value: Any, what: str = "input shape") -> tuple[int, int, int]:
    """``value`` as a ``(C, H, W)`` tuple of positive ints within the ``MAX_*`` bounds; :class:`UsageError` otherwise."""
    if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(_is_int(v) and v >= 1 for v in value):
        raise UsageError(f"{what} must be three positive integers C,H,W, got {short_repr(value)}")
    c, h, w = (int(v) for v in value)
    if c > MAX_CHANNELS or c * h * w > MAX_INPUT_ELEMENTS:
        raise UsageError(f"{what} {[c, h, w]} is too large: at most {MAX_CHANNELS} channels and "
                         f"{MAX_INPUT_ELEMENTS:,} values per image")
    return c, h, w


def nesting_depth(value: Any) -> int:
    """How deeply dicts and lists nest in ``value`` (0 for a scalar), computed without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, (list, tuple)):
            deepest = max(deepest, depth + 1)
            if depth + 1 <= MAX_META_DEPTH:  # deeper is refused anyway: stop walking
                stack.extend((v, depth + 1) for v in item)
            else:
                return depth + 1
    return deepest
