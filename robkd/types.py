"""Shared enums and small dataclasses: threat models, radii parsing, model metadata."""

from __future__ import annotations

import dataclasses
import enum
import math
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


@dataclasses.dataclass(frozen=True)
class ThreatModel:
    """A norm ball of radius ``eps`` in [0,1] pixel space."""

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps >= 0):
            raise UsageError(f"radius must be a finite number >= 0, got {self.eps!r}")


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
    """Human form of a radius: ``8/255`` when it is k/255, else a short decimal."""
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
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise UsageError(f"unknown model metadata keys: {sorted(unknown)}")
        d = dict(d)
        if d.get("input_shape") is not None:
            d["input_shape"] = tuple(int(v) for v in d["input_shape"])
        for k in ("mean", "std"):
            if d.get(k) is not None:
                d[k] = tuple(float(v) for v in d[k])
        return cls(**d)
