"""Naive, textbook implementations that robkd is measured against, and the physical-limit loops.

These are deliberately straightforward: each term of each objective is
computed from its definition (methods.md), with no caching and no sharing of
forward passes, the way it is usually written in a training script. They are
correct; they are the yardstick for robkd's speed *and* the second
computation for its equality checks.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- attacks

@contextlib.contextmanager
def frozen(model):
    """Parameters' ``requires_grad`` off for the block (restored after)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield model
    finally:
        for p, r in saved:
            p.requires_grad_(r)


def physical_limit_pgd(model, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """The irreducible work of PGD-``steps``: ``steps`` forward+backward-to-input passes + 1 forward.

    No update, projection or bookkeeping: only the passes, with the parameters
    frozen (so the forward saves nothing for weight gradients and the backward
    computes input gradients only).
    """
    with frozen(model):
        for _ in range(steps):
            z = x.detach().requires_grad_(True)
            loss = F.cross_entropy(model(z), y, reduction="sum")
            torch.autograd.grad(loss, z)
        with torch.no_grad():
            model(x)


def minimal_pgd(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
                start: torch.Tensor | None = None) -> torch.Tensor:
    """A minimal Linf PGD loop (sign step, clip to the ball, clip to [0,1]); ``start`` is the first iterate."""
    x = x.detach()
    xa = x.clone() if start is None else start.detach().clone()
    for _ in range(steps):
        xa.requires_grad_(True)
        loss = F.cross_entropy(model(xa), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, xa)
        xa = torch.min(torch.max(xa.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0.0, 1.0)
    return xa


# ----------------------------------------------------------------------------- distillation objectives

def kl_batchmean(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(softmax(T/tau) || softmax(S/tau))`` with batchmean reduction, via nn.KLDivLoss."""
    return nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student_logits / tau, dim=1),
                                               F.softmax(teacher_logits / tau, dim=1)) * tau * tau


def naive_kd_loss(student, teacher, x, y, *, l_ce=0.5, l_kl=0.5, tau=1.0) -> torch.Tensor:
    """Hinton KD: ``l_ce*CE(S(x),y) + l_kl*tau^2*KL(T(x)/tau || S(x)/tau)``."""
    s = student(x)
    with torch.no_grad():
        t = teacher(x)
    return l_ce * F.cross_entropy(s, y) + l_kl * kl_batchmean(t, s, tau)


def naive_kdiga_loss(student, teacher, x, y, *, l_ce=0.5, l_kl=0.5, tau=1.0, l_iga=1.0) -> torch.Tensor:
    """KDIGA, each term from its definition: CE and KD on one student forward; the IGA term
    ``(1/B) sum_i ||grad_x CE(S(x_i),y_i) - grad_x CE(T(x_i),y_i)||_2`` on separate forwards
    (student with create_graph=True, teacher gradient detached); teacher logits from another forward."""
    s = student(x)
    with torch.no_grad():
        t = teacher(x)
    xs = x.detach().clone().requires_grad_(True)
    (gs,) = torch.autograd.grad(F.cross_entropy(student(xs), y, reduction="sum"), xs, create_graph=True)
    xt = x.detach().clone().requires_grad_(True)
    (gt,) = torch.autograd.grad(F.cross_entropy(teacher(xt), y, reduction="sum"), xt)
    iga = (gs - gt.detach()).flatten(1).norm(p=2, dim=1).mean()
    return l_ce * F.cross_entropy(s, y) + l_kl * kl_batchmean(t, s, tau) + l_iga * iga


def naive_pgd_ce(model, x, y, *, eps: float, alpha: float, steps: int, generator: torch.Generator | None) -> torch.Tensor:
    """Textbook PGD on CE with a uniform random start (the ARD inner maximisation)."""
    start = (x + (torch.rand(x.shape, generator=generator) * 2 - 1) * eps).clamp(0, 1)
    return minimal_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, start=start)


def naive_ard_loss(student, teacher, x, y, *, alpha=0.9, tau=1.0, eps=0.1, step=0.025, steps=10,
                   generator=None, x_adv=None) -> torch.Tensor:
    """ARD: ``alpha*tau^2*KL(T(x)/tau || S(x_adv)/tau) + (1-alpha)*CE(S(x), y)``, x_adv = PGD-``steps``
    on the student's CE (student in eval mode during the attack), or the given ``x_adv``."""
    if x_adv is None:
        was_training = student.training
        student.eval()
        x_adv = naive_pgd_ce(student, x, y, eps=eps, alpha=step, steps=steps, generator=generator)
        student.train(was_training)
    with torch.no_grad():
        t = teacher(x)
    loss = alpha * kl_batchmean(t, student(x_adv), tau)
    if alpha < 1.0:
        loss = loss + (1 - alpha) * F.cross_entropy(student(x), y)
    return loss


def naive_step(opt: torch.optim.Optimizer, loss_fn) -> float:
    """One optimiser step on ``loss_fn()``; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    opt.step()
    return float(loss.detach())


def naive_fast_ard_batch(student, teacher, opt, x, y, delta: torch.Tensor, *, replays: int, alpha=0.9, tau=1.0,
                         eps=0.1, step=0.1) -> tuple[torch.Tensor, list[float]]:
    """Fast-ARD ("free" adversarial training) on one minibatch, textbook style.

    The batch is replayed ``replays`` times; each replay does one forward on
    ``x_in = clip(x + delta, 0, 1)``, one backward giving both the parameter
    gradient and the input gradient, an optimiser step, and a signed ascent step
    ``x_in + step*sign(grad)`` projected onto the eps-ball around ``x`` and [0,1].
    The teacher logits are recomputed at every replay. Returns the new delta and
    the losses.
    """
    losses = []
    for _ in range(replays):
        x_in = (x + delta).clamp(0, 1).detach().requires_grad_(True)
        with torch.no_grad():
            t = teacher(x)
        loss = alpha * kl_batchmean(t, student(x_in), tau)
        if alpha < 1.0:
            loss = loss + (1 - alpha) * F.cross_entropy(student(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        g = torch.nan_to_num(x_in.grad)
        x_new = (x + (x_in.detach() + step * g.sign() - x).clamp(-eps, eps)).clamp(0, 1)
        delta = x_new - x
        losses.append(float(loss.detach()))
    return delta, losses


# ----------------------------------------------------------------------------- bounds

def naive_ibp(model, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval bound propagation through ``RobustModel(Sequential)`` by lower/upper (not centre/radius)
    arithmetic: ``l' = W+ l + W- u + b``, ``u' = W+ u + W- l + b``. Supports Normalize, Conv2d,
    Linear, ReLU, Flatten."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    mean, std = model.normalize.mean, model.normalize.std
    lo, hi = (lo - mean) / std, (hi - mean) / std
    for layer in model.net:
        if isinstance(layer, nn.ReLU):
            lo, hi = lo.clamp_min(0), hi.clamp_min(0)
        elif isinstance(layer, nn.Flatten):
            lo, hi = lo.flatten(1), hi.flatten(1)
        elif isinstance(layer, (nn.Linear, nn.Conv2d)):
            wp, wn = layer.weight.clamp_min(0), layer.weight.clamp_max(0)
            if isinstance(layer, nn.Linear):
                f = lambda a, w: F.linear(a, w)  # noqa: E731
            else:
                f = lambda a, w: F.conv2d(a, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)  # noqa: E731
            b = layer.bias
            nlo = f(lo, wp) + f(hi, wn)
            nhi = f(hi, wp) + f(lo, wn)
            if b is not None:
                shape = (1, -1) + (1,) * (nlo.dim() - 2)
                nlo, nhi = nlo + b.view(shape), nhi + b.view(shape)
            lo, hi = nlo, nhi
        else:
            raise TypeError(f"naive_ibp: unsupported layer {type(layer).__name__}")
    return lo, hi
