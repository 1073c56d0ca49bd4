"""Saving a :class:`RobustModel` as a self-describing robkd checkpoint (safetensors + JSON metadata)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from robkd.errors import UsageError
from robkd.models.metadata import ROBKD_FORMAT_VERSION
from robkd.models.wrapper import RobustModel
from robkd.utils.io import atomic_write_bytes


def save_model(model: RobustModel, path: str | Path, *, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write a self-describing robkd checkpoint (safetensors + JSON metadata), atomically.

    The model must come from a registered architecture (``meta.arch`` is
    ``robkd:``/``timm:``/``module:Factory``) so that it can be rebuilt.
    """
    from safetensors.torch import save

    if not isinstance(model, RobustModel):
        raise UsageError("save_model expects a RobustModel (wrap it with robkd.models.RobustModel(net, meta))")
    meta = model.meta
    if not meta.arch or meta.arch in ("torchscript", "torch.export") or meta.arch.startswith("pickle:"):
        raise UsageError(f"cannot save a model of architecture {meta.arch!r} as a robkd checkpoint: it cannot be rebuilt by name")
    if meta.input_shape is None or meta.num_classes is None:
        raise UsageError("save_model needs meta.input_shape and meta.num_classes")
    if provenance:
        meta.provenance = {**meta.provenance, **dict(provenance)}
    meta_dict = meta.to_dict()
    meta_dict["source"] = {}
    if meta_dict["mean"] is None:
        meta_dict["mean"] = model.normalize.mean.flatten().tolist()
        meta_dict["std"] = model.normalize.std.flatten().tolist()
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.net.state_dict().items()}
    header = {"robkd": json.dumps({"format_version": ROBKD_FORMAT_VERSION, "meta": meta_dict}, sort_keys=True)}
    data = save(state, metadata=header)
    atomic_write_bytes(path, data)
    return Path(path)
