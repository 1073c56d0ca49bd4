"""``torch.save`` files: a state_dict (loaded with ``weights_only=True``; the architecture comes from the
flags), or a pickled ``nn.Module`` (only with ``allow_pickle``: unpickling runs code from the file)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from robkd.errors import ModelLoadError
from robkd.models.build import build_arch
from robkd.models.metadata import meta_from_flags
from robkd.models.weights import load_state_dict_strict, tensor_specs, unwrap_state_dict
from robkd.types import ModelMeta


def load_torch(p: Path, flags: ModelMeta, allow_pickle: bool) -> tuple[nn.Module, ModelMeta]:
    """The state_dict (or, with ``allow_pickle``, the pickled module) in a ``torch.save`` file."""
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        unsafe = "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg
        if not unsafe:
            first = next((line.strip() for line in msg.splitlines() if line.strip()), type(exc).__name__)
            raise ModelLoadError(f"corrupt torch.save file {p}: {first}") from exc
        if not allow_pickle:
            raise ModelLoadError(
                f"{p} is a pickled Python object (e.g. a whole nn.Module), and unpickling runs arbitrary code: "
                "re-save it as a state_dict, or pass --allow-pickle only if you trust the file"
            ) from None
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelLoadError(f"cannot unpickle {p}: {exc2}") from exc2
    if isinstance(obj, nn.Module):
        return obj, ModelMeta(arch=f"pickle:{type(obj).__module__}.{type(obj).__qualname__}")
    state = unwrap_state_dict(obj)
    if state is None:
        raise ModelLoadError(f"{p} holds a {type(obj).__name__}, neither a state_dict nor an nn.Module")
    meta = meta_from_flags(flags)
    net = build_arch(meta, tensor_specs(state), str(p))
    load_state_dict_strict(net, state, str(p))
    return net, meta
