"""Choosing the front end that turns a model into bound operators.

Plain ``nn.Module`` s are traced with ``torch.fx`` first (:mod:`robkd.bounds.trace`): it is fast, and its
reports name the user's own modules. When fx cannot trace the model, or leaves operators it does not
cover, the model is exported with ``torch.export`` and its ATen graph is used instead
(:mod:`robkd.bounds.export_trace`), which normalises what fx sees in many spellings (functional max
pooling, ``x.mean((2, 3))``, ``addmm``...). Models that are already exported programs, TorchScript or
converted graphs (a loaded ``.pt2``, ``.pt`` TorchScript archive or ``.onnx`` file) go to the export
front end directly. Exported graphs are cached per model while its parameters are unchanged.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from robkd.bounds.export_trace import trace_network_export
from robkd.bounds.trace import TracedGraph, trace_model
from robkd.errors import UnsupportedModelError

_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[Any, TracedGraph]]" = weakref.WeakKeyDictionary()


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's first floating parameter or buffer (float32 when there is none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _needs_export(model: nn.Module) -> bool:
    """Whether the model holds an exported program, TorchScript or an fx graph (e.g. converted from ONNX)."""
    return any(isinstance(m, (torch.jit.ScriptModule, torch.fx.GraphModule)) or type(m).__name__ == "ExportedModule"
               for m in model.modules())


def _fingerprint(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> tuple:
    tensors = list(model.parameters()) + list(model.buffers())
    return (input_shape, dtype, tuple((id(t), t._version) for t in tensors))


def trace_network(model: nn.Module, input_shape: tuple[int, ...]) -> TracedGraph:
    """Bound operators for ``model`` on per-sample inputs of ``input_shape`` (see the module docstring).

    Raises :class:`UnsupportedModelError` when no front end can trace the model; unsupported operators are
    collected in the result instead (reported by :meth:`BoundedModel.check`)."""
    dtype = model_dtype(model)
    if not _needs_export(model):
        try:
            fx = trace_model(model, input_shape, dtype)
        except UnsupportedModelError:
            return _exported(model, input_shape, dtype)
        if not fx.unsupported:
            return fx
        try:
            exported = _exported(model, input_shape, dtype)
        except UnsupportedModelError:
            return fx
        return exported if not exported.unsupported else fx
    return _exported(model, input_shape, dtype)


def _exported(model: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> TracedGraph:
    key = _fingerprint(model, input_shape, dtype)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    traced = trace_network_export(model, input_shape, dtype)
    try:
        _CACHE[model] = (key, traced)
    except TypeError:  # not weak-referenceable
        pass
    return traced
