"""Model file formats, one module each; :data:`LOADERS` maps what :func:`detect_format` returns to its loader.

* ``robkd``: safetensors whose header metadata has a ``robkd`` entry (architecture, kwargs, classes,
  input shape, mean/std, dataset, provenance) -- :mod:`.checkpoint`;
* ``safetensors``: a plain safetensors state_dict (needs ``arch``) -- :mod:`.checkpoint`;
* ``torchscript``: a ``torch.jit.save`` archive -- :mod:`.torchscript`;
* ``export``: a ``torch.export`` program (``.pt2`` archive) -- :mod:`.export`;
* ``onnx``: an ONNX model, converted with onnx2torch (optional ``onnx`` extra) -- :mod:`.onnx_file`;
* ``torch``: a ``torch.save`` state_dict (``weights_only=True``; needs ``arch``), or a pickled
  ``nn.Module`` (only with ``allow_pickle=True``: pickle runs code) -- :mod:`.torch_save`.

A loader is called as ``loader(path, flags, allow_pickle)`` and returns ``(net, meta)``: the module taking
normalised inputs and the metadata the file carries (``flags``: what the caller said about the model).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from torch import nn

from robkd.models.formats.checkpoint import load_robkd, load_safetensors
from robkd.models.formats.detect import detect_format
from robkd.models.formats.export import load_export
from robkd.models.formats.onnx_file import load_onnx
from robkd.models.formats.torch_save import load_torch
from robkd.models.formats.torchscript import load_torchscript
from robkd.types import ModelMeta

Loader = Callable[[Path, ModelMeta, bool], tuple[nn.Module, ModelMeta]]

LOADERS: dict[str, Loader] = {
    "robkd": load_robkd,
    "safetensors": load_safetensors,
    "torchscript": load_torchscript,
    "export": load_export,
    "onnx": load_onnx,
    "torch": load_torch,
}

__all__ = ["LOADERS", "Loader", "detect_format"]
