"""Loss terms of every training objective, as plain functions of logits / input gradients.

Conventions (see ``/work/shared/notes/methods.md``):

* logits are ``(B, K)``; labels ``(B,)`` int64; ``B`` is the batch size;
* ``KL(P || Q) = sum_k P_k (log P_k - log Q_k)`` where ``P`` is the *target*
  distribution; every KL here has ``batchmean`` reduction: summed over the
  classes, averaged over the samples (never divided by ``B*K``);
* cross-entropy is averaged over the batch unless stated otherwise;
* input gradients ``g_i = d CE(f(x_i), y_i) / d x_i`` are *per-sample*
  gradients, i.e. gradients of the **summed** cross-entropy, so that they do not
  carry a ``1/B`` factor.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from robkd.distill.config import IGA_FORMS
from robkd.errors import UsageError

__all__ = [
    "cross_entropy",
    "distillation_kl",
    "input_gradient",
    "iga_per_sample",
    "iga_reference",
    "iga_term",
    "kl_divergence",
    "trades_kl",
]


def _check_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or a.shape != b.shape:
        raise UsageError(f"logits must be two (B, K) tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def _check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not t > 0 or t != t or t == float("inf"):
        raise UsageError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``CE = -(1/B) sum_i log softmax(logits_i)[y_i]`` (``reduction="mean"``; also ``"sum"``/``"none"``)."""
    return F.cross_entropy(logits, y, reduction=reduction)


def kl_divergence(target_logits: torch.Tensor, input_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """``KL(P || Q)`` with ``P = softmax(target_logits)``, ``Q = softmax(input_logits)``.

    ``KL = (1/B) sum_i sum_k P_ik (log P_ik - log Q_ik)`` (``batchmean``);
    ``reduction="none"`` returns the per-sample values ``(B,)``. Gradients flow
    into both arguments (detach the target yourself when it is a constant).
    """
    _check_logits(target_logits, input_logits)
    log_p = F.log_softmax(target_logits, dim=1)
    log_q = F.log_softmax(input_logits, dim=1)
    per_sample = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    if reduction == "none":
        return per_sample
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise UsageError(f"unknown KL reduction {reduction!r}: use 'batchmean', 'sum' or 'none'")


def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Hinton's distillation term ``tau^2 * KL(softmax(T/tau) || softmax(S/tau))``, batchmean.

    ``= tau^2 * (1/B) sum_i sum_k p^T_ik (log p^T_ik - log p^S_ik)`` with
    ``p^T = softmax(T/tau)``, ``p^S = softmax(S/tau)``. The teacher logits are
    detached (the teacher is a constant); the ``tau^2`` factor keeps the
    gradient scale independent of ``tau``.
    """
    tau = _check_temperature(temperature)
    return tau * tau * kl_divergence(teacher_logits.detach() / tau, student_logits / tau)


def trades_kl(natural_logits: torch.Tensor, adv_logits: torch.Tensor, reduction: str = "batchmean") -> torch.Tensor:
    """TRADES robust term ``KL(f(x) || f(x_adv))``: target ``softmax(f(x))``, batchmean.

    ``= (1/B) sum_i sum_k p_ik(x) (log p_ik(x) - log p_ik(x_adv))``. As in the
    TRADES reference implementation, gradients flow through both arguments.
    """
    return kl_divergence(natural_logits, adv_logits, reduction=reduction)


def input_gradient(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample input gradients ``g_i = d CE(f(x_i), y_i) / d x_i`` and the logits ``f(x)``.

    Computed as the gradient of the *summed* CE (so no ``1/B`` factor), with
    ``torch.autograd.grad`` only (parameter ``.grad`` fields are untouched).
    ``create_graph=True`` keeps the graph for double backpropagation (the
    student side of IGA); otherwise the gradient is detached.
    """
    from robkd.utils.modules import ce_input_gradient

    _, g, logits = ce_input_gradient(model, x, y, create_graph=create_graph)
    return g, logits


def _check_grads(g_s: torch.Tensor, g_t: torch.Tensor) -> None:
    if g_s.shape != g_t.shape or g_s.dim() < 2 or g_s.shape[0] == 0:
        raise UsageError(f"student and teacher input gradients must be non-empty (B, ...) tensors of one shape, got {tuple(g_s.shape)} and {tuple(g_t.shape)}")


def iga_per_sample(g_s: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    """Per-sample IGA: ``(1/B) sum_i || g_s,i - g_t,i ||_2`` (robkd's default form).

    ``g_s``, ``g_t`` are per-sample CE input gradients (:func:`input_gradient`).
    The norm is not squared. The value does not depend on the batch size, so a
    coefficient ``lambda_iga`` means the same thing for every ``B``.
    """
    _check_grads(g_s, g_t)
    return torch.linalg.vector_norm((g_s - g_t.detach()).flatten(1), ord=2, dim=1).mean()


def iga_reference(g_s: torch.Tensor, g_t: torch.Tensor) -> torch.Tensor:
    """The KDIGA reference code's IGA term (without its coefficient): ``(1/B^2) * sqrt(sum_i ||g_s,i - g_t,i||_2^2)``.

    The reference code takes one L2 norm over the whole batch of gradients of
    the batch-*mean* CE (each carrying ``1/B``) and multiplies by ``gamma/B``.
    With per-sample gradients ``g`` that is ``(gamma/B) * ||(g_s - g_t)/B||_F``,
    i.e. ``gamma *`` this function. So ``lambda_iga`` with this form is exactly
    the reference code's ``gamma`` (the paper's ``10^3/B`` on ImageNet is
    ``gamma = 1000``). For ``||g_s,i - g_t,i|| = d`` for all ``i`` it equals
    ``d / B^1.5``: its scale shrinks with the batch size.
    """
    _check_grads(g_s, g_t)
    b = g_s.shape[0]
    return torch.linalg.vector_norm((g_s - g_t.detach()).flatten(), ord=2) / float(b * b)


def iga_term(g_s: torch.Tensor, g_t: torch.Tensor, form: str = "per-sample") -> torch.Tensor:
    """Dispatch to :func:`iga_per_sample` (``"per-sample"``) or :func:`iga_reference` (``"reference"``)."""
    if form == "per-sample":
        return iga_per_sample(g_s, g_t)
    if form == "reference":
        return iga_reference(g_s, g_t)
    raise UsageError(f"unknown IGA form {form!r}: use one of {', '.join(IGA_FORMS)}")
