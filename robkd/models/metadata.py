"""Model metadata: the ``robkd`` entry of a checkpoint (parsed and validated field by field), and the
metadata completed from flags and data without ever silently overriding what a file says."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from robkd.errors import ModelLoadError, RobkdError, UsageError
from robkd.models.messages import first_line
from robkd.types import ModelMeta

ROBKD_FORMAT_VERSION = "1"
"""The version of the robkd checkpoint format this robkd writes and reads."""


def parse_robkd_meta(raw: Mapping[str, str], path: Path) -> ModelMeta:
    """The :class:`ModelMeta` in a robkd checkpoint's ``robkd`` metadata entry (a JSON string), every
    field checked (:meth:`ModelMeta.validate`); :class:`ModelLoadError` for anything malformed."""
    try:
        info = json.loads(raw["robkd"])
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else first_line(exc)
        raise ModelLoadError(f"corrupt robkd metadata in {path}: not a JSON object ({reason})") from exc
    if not isinstance(info, dict) or not isinstance(info.get("meta"), dict):
        raise ModelLoadError(f"corrupt robkd metadata in {path}: want an object with 'format_version' and 'meta'")
    if str(info.get("format_version"))[:20] != ROBKD_FORMAT_VERSION:
        raise ModelLoadError(f"{path} is robkd checkpoint format {str(info.get('format_version'))[:20]!r}, "
                             f"this robkd reads {ROBKD_FORMAT_VERSION}")
    try:
        return ModelMeta.from_dict(info["meta"])
    except RobkdError as exc:
        raise ModelLoadError(f"corrupt robkd metadata in {path}: {exc}") from exc


def meta_from_flags(flags: ModelMeta) -> ModelMeta:
    """A weights-only file's metadata: what the flags say (no provenance, no source)."""
    return ModelMeta(**{k: v for k, v in vars(flags).items() if k not in ("provenance", "source")})


def data_hints(dataset: Any) -> tuple[tuple[int, int, int] | None, int | None]:
    """``(input_shape, num_classes)`` of a dataset name or loaded data (``(None, None)`` when unknown)."""
    if dataset is None:
        return None, None
    if isinstance(dataset, str):
        from robkd.data import dataset_info

        info = dataset_info(dataset)
        if info is None:
            raise UsageError(f"unknown dataset {dataset!r} for the model's input shape: pass input_shape=(C, H, W)")
        return tuple(info.input_shape), (int(info.num_classes) or None)
    shape, classes = getattr(dataset, "input_shape", None), getattr(dataset, "num_classes", None)
    if shape is None:
        raise UsageError(f"dataset must be a dataset name or robkd ImageData, got {type(dataset).__name__}")
    return tuple(int(v) for v in shape), (int(classes) if classes else None)


def apply_overrides(meta: ModelMeta, flags: ModelMeta) -> None:
    """Fill in metadata the file does not carry from the flags; a flag that contradicts the file's own
    value is an error (in an audit the flags apply to both models, so an override would silently
    re-normalise a checkpoint that knows its own normalisation)."""
    for name in ("num_classes", "input_shape", "mean", "std"):
        value = getattr(flags, name)
        if value is None:
            continue
        own = getattr(meta, name)
        if own is not None and not _same(own, value):
            raise UsageError(f"the model file says {name} = {_show(own)}, the flags say {_show(value)}: drop the flag "
                             f"for this model (its file already carries the value)")
        setattr(meta, name, value)
    if meta.mean is not None and meta.std is not None and len(meta.mean) != len(meta.std):
        raise UsageError(f"mean has {len(meta.mean)} values but std has {len(meta.std)}")


def _same(a: Any, b: Any) -> bool:
    """Equal values; sequences compared element-wise up to a relative 1e-6."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(abs(float(u) - float(v)) <= 1e-6 * max(1.0, abs(float(u))) for u, v in zip(a, b))
    return a == b


def _show(v: Any) -> str:
    """A value as a flag would spell it (``0.5,0.5,0.5``)."""
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)
