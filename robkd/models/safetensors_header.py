"""Reading safetensors files: the header (metadata and tensor table, no tensor loaded) and the tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from robkd.errors import ModelLoadError
from robkd.models.messages import first_line
from robkd.models.weights import TensorSpec


def read_header(path: Path) -> tuple[dict[str, str], dict[str, TensorSpec]]:
    """``(metadata, {name: (shape, kind)})`` of a safetensors file, read without loading any tensor.

    The one place a safetensors header is parsed: the safetensors library validates it (JSON depth,
    ``__metadata__`` a mapping of strings, dtypes, shapes and offsets against the file size), and
    anything it refuses is one :class:`ModelLoadError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            table = {}
            for name in fh.keys():
                sl = fh.get_slice(name)
                table[name] = (tuple(int(v) for v in sl.get_shape()), _dtype_kind(sl.get_dtype()))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ... on a hostile header
        raise ModelLoadError(f"corrupt safetensors header in {path}: {first_line(exc)}") from exc
    return dict(meta), table


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; :class:`ModelLoadError` for corrupt data."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise ModelLoadError(f"corrupt safetensors data in {path}: {first_line(exc)}") from exc


def _dtype_kind(dtype: str) -> str:
    """The kind (as in :data:`~robkd.models.weights.TensorSpec`) of a safetensors dtype name."""
    d = str(dtype).upper()
    if d == "BOOL":
        return "bool"
    if d.startswith(("F", "BF")):
        return "float"
    if d.startswith(("I", "U")):
        return "int"
    return "complex" if d.startswith("C") else "other"
