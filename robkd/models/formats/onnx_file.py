"""ONNX models (``.onnx``): converted to PyTorch with onnx2torch (the optional ``onnx`` extra).

An ONNX graph is an inference graph: it runs in eval mode whatever robkd asks. Like a ``.pt2`` program it
takes normalised inputs unless told otherwise; the normalisation comes from ``--mean/--std`` or from the
file's ``metadata_props`` (keys ``mean``, ``std``, ``num_classes``, ``dataset``; lists as JSON or
comma-separated numbers), and the input shape from the graph's first input when it is static. A graph
exported with a fixed batch size runs other batches in chunks of that size."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robkd.errors import ModelLoadError, RobkdError
from robkd.models.formats.export import ExportedModule
from robkd.models.messages import first_line
from robkd.types import ModelMeta

log = logging.getLogger(__name__)

INSTALL_HINT = "reading .onnx files needs the onnx extra: pip install 'robkd[onnx]' (onnx, onnx2torch)"


def onnx_available() -> bool:
    """Whether the optional onnx package is installed."""
    import importlib.util

    return importlib.util.find_spec("onnx") is not None


def looks_like_onnx(p: Path) -> bool:
    """Whether ``p`` parses as an ONNX ModelProto with a graph (False when onnx is not installed)."""
    try:
        import onnx
    except ImportError:
        return False
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except Exception:  # noqa: BLE001 - any parse failure: not ONNX
        return False
    return bool(proto.graph.node) and proto.ir_version > 0


def load_onnx(p: Path, flags: ModelMeta, allow_pickle: bool) -> tuple[nn.Module, ModelMeta]:
    """The ONNX model as an eval-mode module, with the metadata its ``metadata_props`` carry."""
    try:
        import onnx
        from onnx2torch import convert
    except ImportError as exc:
        raise ModelLoadError(INSTALL_HINT) from exc
    try:
        proto = onnx.load(str(p))
        onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"corrupt ONNX model {p}: {first_line(exc)}") from exc
    if len(proto.graph.output) != 1:
        raise ModelLoadError(f"{p} has {len(proto.graph.output)} outputs; robkd needs one logits output")
    net = _convert(proto, p, convert)
    net.eval()
    meta = _meta(proto, p)
    meta.arch = "onnx"
    batch = _static_batch(proto)
    fixed = None
    if batch is not None and meta.input_shape is not None:
        fixed = _fixed_batch(net, batch, meta.input_shape)
    return ExportedModule(net, fixed), meta


def _dims(proto: Any) -> list[int | None]:
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if not inputs:
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]


def _static_batch(proto: Any) -> int | None:
    dims = _dims(proto)
    return dims[0] if dims and dims[0] else None


def _meta(proto: Any, p: Path) -> ModelMeta:
    """Input shape from the graph; mean/std/num_classes/dataset from ``metadata_props``."""
    meta = ModelMeta()
    dims = _dims(proto)
    if len(dims) == 4 and all(d for d in dims[1:]):
        meta.input_shape = tuple(int(d) for d in dims[1:])
    props = {e.key: e.value for e in proto.metadata_props}
    try:
        for key in ("mean", "std"):
            if key in props:
                setattr(meta, key, tuple(float(v) for v in _numbers(props[key])))
        if "num_classes" in props:
            meta.num_classes = int(props["num_classes"])
        if "dataset" in props:
            meta.dataset = str(props["dataset"])
        meta.validate()
    except (ValueError, TypeError, RobkdError) as exc:
        raise ModelLoadError(f"{p}: unreadable metadata_props ({first_line(exc)})") from exc
    return meta


def _numbers(text: str) -> list[float]:
    text = text.strip()
    if text.startswith("["):
        vals = json.loads(text)
        if not isinstance(vals, list):
            raise ValueError(f"not a list: {text[:40]}")
        return [float(v) for v in vals]
    return [float(v) for v in text.replace(" ", ",").split(",") if v]


def _fixed_batch(net: nn.Module, batch: int, shape: tuple[int, ...]) -> int | None:
    """``batch`` when the converted graph accepts no other batch size (a fixed-batch export)."""
    other = 1 if batch > 1 else 2
    try:
        with torch.no_grad():
            out = net(torch.zeros((other,) + tuple(shape)))
        if isinstance(out, torch.Tensor) and out.shape[0] == other:
            return None
    except Exception:  # noqa: BLE001 - a reshape to the fixed batch
        pass
    return batch


def _convert(proto: Any, p: Path, convert: Any) -> nn.Module:
    """onnx2torch's conversion; for graphs of newer opsets than onnx2torch knows (torch's dynamo exporter
    writes opset 18+), retried after :func:`_compat` and a conversion to opset 17."""
    try:
        return convert(proto)
    except Exception as first:  # noqa: BLE001 - unsupported ONNX operators / opsets
        try:
            from onnx import version_converter

            _compat(proto)
            return convert(version_converter.convert_version(proto, 17))
        except Exception:  # noqa: BLE001
            pass
        raise ModelLoadError(f"onnx2torch cannot convert {p}: {first_line(first)}") from first


def _compat(proto: Any) -> None:
    """``Reshape(allowzero=1)`` whose target shape is a constant without zeros means the same as
    ``allowzero=0``, which onnx2torch supports: rewrite it in place."""
    from onnx import numpy_helper

    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
    for n in proto.graph.node:
        if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] in consts and (consts[n.input[1]] != 0).all():
            for a in n.attribute:
                if a.name == "allowzero":
                    a.i = 0
