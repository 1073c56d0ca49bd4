"""State dicts: finding one in a container, describing its tensors, loading it strictly with one clear error."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from robkd.errors import ModelLoadError
from robkd.models.messages import first_line, short_list

TensorSpec = tuple[tuple[int, ...], str]
"""A stored tensor as ``(shape, kind)``; kind is ``float``, ``int``, ``bool``, ``complex`` or ``other``."""

STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
"""Keys under which checkpoints commonly keep their state_dict, searched in this order."""


def tensor_kind(t: torch.Tensor) -> str:
    """``bool``, ``float``, ``complex`` or ``int``: what values a tensor holds."""
    if t.dtype == torch.bool:
        return "bool"
    if t.dtype.is_floating_point:
        return "float"
    return "complex" if t.dtype.is_complex else "int"


def tensor_specs(state: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
    """``{name: (shape, kind)}`` of a state_dict."""
    return {k: (tuple(int(v) for v in t.shape), tensor_kind(t)) for k, t in state.items()}


def strip_ddp_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """The mapping without DDP's ``module.`` prefix when every (and at least one) key has it."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """Find a state_dict in common containers (``{"state_dict": ...}`` and the like, at most 8 levels
    deep); strip a DDP ``module.`` prefix. ``None`` when there is none."""
    stack = [(obj, 0)]  # depth first, in the order of STATE_DICT_KEYS, without recursion
    while stack:
        obj, depth = stack.pop()
        if not isinstance(obj, Mapping):
            continue
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return strip_ddp_prefix(obj)
        if depth < 8:
            stack.extend((obj[k], depth + 1) for k in reversed(STATE_DICT_KEYS) if k in obj)
    return None


def match_weights(own: Mapping[str, TensorSpec], given: Mapping[str, TensorSpec], source: str) -> None:
    """:class:`ModelLoadError` listing every missing, unexpected, mis-shaped or mis-typed tensor."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    common = sorted(set(own) & set(given))
    shape = [f"{k}: file {given[k][0]} vs model {own[k][0]}" for k in common if given[k][0] != own[k][0]]
    kind = [f"{k}: file {given[k][1]} vs model {own[k][1]}" for k in common if given[k][1] != own[k][1]]
    if missing or unexpected or shape or kind:
        parts = []
        if missing:
            parts.append(f"missing keys {short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {short_list(unexpected)}")
        if shape:
            parts.append(f"shape mismatches {short_list(shape)}")
        if kind:
            parts.append(f"dtype mismatches {short_list(kind)}")
        raise ModelLoadError(f"weights in {source} do not match the architecture: " + "; ".join(parts))


def load_state_dict_strict(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one clear error listing every mismatch (names, shapes, and
    kinds: a float parameter never takes integer or boolean values)."""
    match_weights(tensor_specs(net.state_dict()), tensor_specs(state), source)
    try:
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - what the comparison above cannot foresee (user modules' hooks)
        raise ModelLoadError(f"weights in {source} do not load: {first_line(exc)}") from exc
