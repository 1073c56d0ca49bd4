"""Small helpers on ``nn.Module`` every package uses: where a model lives, eval mode restored exactly,
and the input gradient (never a parameter gradient)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU when it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


class eval_mode:
    """Context manager: ``modules`` in eval mode (and, with ``freeze``, every parameter's ``requires_grad``
    off, so that no parameter gradient is ever computed); every submodule's ``training`` flag and every
    parameter's ``requires_grad`` come back exactly as they were, also on error."""

    def __init__(self, *modules: nn.Module, freeze: bool = False) -> None:
        self.modules = modules
        self.freeze = freeze
        self._modes: list[tuple[nn.Module, bool]] = []
        self._params: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> None:
        self._modes = [(sub, sub.training) for m in self.modules for sub in m.modules()]
        self._params = [(p, p.requires_grad) for m in self.modules for p in m.parameters()] if self.freeze else []
        for m in self.modules:
            m.eval()
        for p, _ in self._params:
            p.requires_grad_(False)

    def __exit__(self, *exc: object) -> None:
        for sub, flag in self._modes:
            sub.training = flag
        for p, req in self._params:
            p.requires_grad_(req)


def input_gradient(loss: torch.Tensor, x: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
    """``d loss.sum() / d x`` with ``torch.autograd.grad`` (the input only: parameter ``.grad`` untouched).

    Summing per-sample losses gives each row its own sample's gradient (no ``1/B`` factor)."""
    (g,) = torch.autograd.grad(loss.sum(), x, create_graph=create_graph)
    return g


def ce_input_gradient(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
                      create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy ``(B,)``, its input gradient ``g_i = d CE(f(x_i), y_i) / d x_i`` and the logits.

    ``create_graph=True`` keeps the graph (double backpropagation); otherwise all three are detached."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(xg)
        ce = F.cross_entropy(logits, y, reduction="none")
        g = input_gradient(ce, xg, create_graph=create_graph)
    if not create_graph:
        return ce.detach(), g.detach(), logits.detach()
    return ce, g, logits
