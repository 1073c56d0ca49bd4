"""TorchScript archives (``torch.jit.save``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from robkd.errors import ModelLoadError
from robkd.types import ModelMeta


def load_torchscript(p: Path, flags: ModelMeta, allow_pickle: bool) -> tuple[nn.Module, ModelMeta]:
    """A TorchScript module, loaded on the CPU (its metadata knows only the format)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        try:
            net = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"corrupt TorchScript file {p}: {exc}") from exc
    return net, ModelMeta(arch="torchscript")
