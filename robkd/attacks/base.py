"""The :class:`Attack` base class and the forward-pass re-check :func:`verify_adversarial`.

The base class owns everything an attack must not get wrong on its own:
eval mode (set for the attack, each module's previous mode restored after),
device placement, frozen parameters (no parameter gradient is ever computed),
input validation (x in [0,1], shapes, label range, eps >= 0), targeting and
batching. A concrete attack only implements :meth:`Attack._perturb` (one batch).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch import nn

from robkd.attacks._geometry import lp_norm
from robkd.attacks.noise import SampleNoise
from robkd.errors import UsageError
from robkd.types import Norm
from robkd.utils.logits import NON_FINITE, predict
from robkd.utils.modules import eval_mode, input_gradient, model_device
from robkd.utils.validate import check_int

logger = logging.getLogger("robkd.attacks")

#: absolute + relative slack allowed on the perturbation norm by the re-check (float32 round-off)
NORM_TOLERANCE = 1e-5


@dataclasses.dataclass
class AttackOutput:
    """Result of :meth:`Attack.run`: the points and the attack's own success claim (both per sample)."""

    x_adv: torch.Tensor
    success: torch.Tensor


def attack_mode(model: nn.Module) -> eval_mode:
    """Eval mode and frozen parameters for the duration of an attack; the exact previous state is restored.

    Every module's ``training`` flag and every parameter's ``requires_grad`` are
    saved and put back afterwards (also on error), so mixed-mode models survive.
    Freezing parameters guarantees that no parameter gradient is computed, even by
    third-party attacks that call ``backward()``.
    """
    return eval_mode(model, freeze=True)


def num_classes_of(model: nn.Module, x: torch.Tensor) -> int:
    """Number of classes from ``model.meta`` or, failing that, one forward pass on one sample.

    The probe runs in eval mode (:func:`attack_mode`), so it neither updates BatchNorm statistics
    nor fails on a batch of one in train mode."""
    meta = getattr(model, "meta", None)
    k = getattr(meta, "num_classes", None)
    if isinstance(k, int) and k > 0:
        return k
    with attack_mode(model), torch.no_grad():
        out = model(x[:1].to(model_device(model)))
    if out.dim() != 2:
        raise UsageError(f"the model must return logits of shape (B, K), got {tuple(out.shape)}")
    return int(out.shape[1])


def check_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> int:
    """Validate a batch for an attack; returns the number of classes. Raises :class:`UsageError`."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise UsageError("x and y must be torch tensors")
    if x.dim() < 2:
        raise UsageError(f"x must be batched (N, ...), got shape {tuple(x.shape)}")
    if not torch.is_floating_point(x):
        raise UsageError(f"x must be a float tensor in [0,1], got dtype {x.dtype} (convert uint8 images with /255)")
    if y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise UsageError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise UsageError(f"y must hold integer class labels, got dtype {y.dtype}")
    if x.shape[0] == 0:
        return 0
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise UsageError("x must lie in [0,1] pixel space (normalisation belongs inside the model)")
    meta = getattr(model, "meta", None)
    shape = getattr(meta, "input_shape", None)
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise UsageError(f"x has sample shape {tuple(x.shape[1:])} but the model expects {tuple(shape)}")
    k = num_classes_of(model, x.to(model_device(model)))
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise UsageError(f"labels must be in [0, {k - 1}], got range [{int(y.min())}, {int(y.max())}]")
    if target is not None:
        if not isinstance(target, torch.Tensor) or target.shape != y.shape:
            raise UsageError(f"target must be a label tensor of shape {tuple(y.shape)}")
        if int(target.min()) < 0 or int(target.max()) >= k:
            raise UsageError(f"target labels must be in [0, {k - 1}]")
    return k


def _check_eps(eps: object) -> float:
    try:
        value = float(eps)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise UsageError(f"eps must be a number, got {eps!r}") from exc
    if not (value >= 0.0) or value == float("inf"):
        raise UsageError(f"eps must be finite and >= 0, got {eps!r}")
    return value


class Attack:
    """Base class of all attacks (untargeted by default) in [0,1] pixel space.

    Subclasses set :attr:`name` / :attr:`cost` and implement :meth:`_perturb`,
    which receives one batch already on the model's device, with the model in eval
    mode and its parameters frozen, and returns an :class:`AttackOutput`.

    ``cost`` is the approximate number of forward+backward passes per sample; the
    :class:`~robkd.attacks.Suite` runs attacks in ascending cost.
    """

    name: str = "attack"
    cost: float = 1.0
    #: whether the attack can aim at a chosen target class
    supports_targeted: bool = True
    #: whether the base class splits the input into ``batch_size`` chunks (False: the attack batches itself)
    base_batching: bool = True

    def __init__(self, norm: "Norm | str", eps: float, *, seed: int = 0, batch_size: int = 256) -> None:
        self.norm = Norm.parse(norm)
        self.eps = _check_eps(eps)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UsageError(f"seed must be an integer, got {seed!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.seed = seed
        self.batch_size = batch_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, norm={self.norm.value}, eps={self.eps:g})"

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Adversarial examples for ``(x, y)`` (on ``x``'s device); ``target`` makes the attack targeted."""
        return self.run(model, x, y, target=target).x_adv

    def run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        on_batch: Callable[[int], None] | None = None,
        sample_ids: torch.Tensor | None = None,
    ) -> AttackOutput:
        """Attack ``(x, y)``: returns the points and the per-sample success claim.

        ``on_batch(n)`` is called after each batch of ``n`` samples (progress).
        The claim is re-checked by the suite with :func:`verify_adversarial`.
        Randomness (random starts) is drawn per sample from ``(seed, sample id)``
        (:class:`~robkd.attacks.noise.SampleNoise`): ``sample_ids`` (``(N,)`` integers,
        default ``0..N-1``) name the rows, so a sample's result does not depend on
        the batch size or on the other samples of its batch or shard.
        """
        check_inputs(model, x, y, target)
        ids = check_sample_ids(sample_ids, x.shape[0])
        if target is not None and not self.supports_targeted:
            raise UsageError(f"{self.name} does not support targeted attacks")
        out_device = x.device
        n = x.shape[0]
        if n == 0 or self.eps == 0.0:
            if on_batch is not None and n:
                on_batch(n)
            return AttackOutput(x.detach().clone(), torch.zeros(n, dtype=torch.bool, device=out_device))
        device = model_device(model)
        with attack_mode(model):
            if not self.base_batching:
                out = self._perturb(model, x.detach().to(device), y.to(device),
                                    None if target is None else target.to(device),
                                    SampleNoise(self.seed, ids, device=device))
                if on_batch is not None:
                    on_batch(n)
                return AttackOutput(out.x_adv.detach().to(out_device), out.success.to(out_device))
            xs, ss = [], []
            for s in range(0, n, self.batch_size):
                xb = x[s : s + self.batch_size].detach().to(device)
                yb = y[s : s + self.batch_size].to(device)
                tb = None if target is None else target[s : s + self.batch_size].to(device)
                noise = SampleNoise(self.seed, ids[s : s + self.batch_size], device=device)
                out = self._perturb(model, xb, yb, tb, noise)
                xs.append(out.x_adv.detach().to(out_device))
                ss.append(out.success.to(out_device))
                if on_batch is not None:
                    on_batch(xb.shape[0])
        return AttackOutput(torch.cat(xs), torch.cat(ss))

    def _perturb(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        target: torch.Tensor | None,
        generator: SampleNoise,
    ) -> AttackOutput:  # pragma: no cover - abstract
        """One batch; ``generator`` holds the rows' per-sample random streams (``generator.subset(idx)``
        for some of the rows)."""
        raise NotImplementedError


def check_sample_ids(sample_ids: object, n: int) -> torch.Tensor:
    """``(n,)`` int64 CPU sample ids (default ``0..n-1``); malformed ids are a :class:`UsageError`."""
    if sample_ids is None:
        return torch.arange(n, dtype=torch.int64)
    if (not isinstance(sample_ids, torch.Tensor) or sample_ids.shape != (n,)
            or sample_ids.dtype.is_floating_point or sample_ids.dtype == torch.bool):
        raise UsageError(f"sample_ids must be an integer tensor of shape ({n},)")
    return sample_ids.detach().to("cpu", torch.int64)


def is_success(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Untargeted: prediction differs from ``y``; targeted: prediction equals ``target``. A row with a
    non-finite output is a success either way (robkd's non-finite policy, :mod:`robkd.utils.logits`):
    the model gave no answer there, so the sample is not robust."""
    pred = predict(logits)
    hit = pred == target if target is not None else pred != y
    return hit | (pred == NON_FINITE)


def attack_gradient(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The input gradient an attack steps along (:func:`robkd.utils.modules.input_gradient`), NaN/inf mapped
    to 0 so that one bad sample cannot poison the step of the others."""
    return torch.nan_to_num(input_gradient(loss, x), nan=0.0, posinf=0.0, neginf=0.0)


def verify_adversarial(
    model: nn.Module,
    x: torch.Tensor,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    norm: "Norm | str",
    eps: "float | torch.Tensor",
    *,
    target: torch.Tensor | None = None,
    batch_size: int = 512,
    tol: float = NORM_TOLERANCE,
) -> torch.Tensor:
    """Re-check adversarial examples with a plain forward pass; returns ``(N,)`` bool.

    A sample passes when (a) ``x_adv`` lies in [0,1] (exactly), (b) its
    perturbation norm is at most ``eps * (1 + tol) + tol``, and (c) the model
    (eval mode) misclassifies it (or predicts ``target`` for a targeted attack).
    """
    norm = Norm.parse(norm)
    if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
        raise UsageError(f"x_adv must have the shape of x {tuple(x.shape)}")
    check_inputs(model, x, y, target)
    n = x.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    if isinstance(eps, torch.Tensor):
        eps_t = eps.detach().to(device=x.device, dtype=torch.float64).reshape(-1)
        if eps_t.numel() == 1:
            eps_t = eps_t.expand(n)
        if eps_t.shape != (n,):
            raise UsageError(f"eps must be a float or a tensor of shape ({n},)")
    else:
        eps_t = torch.full((n,), _check_eps(eps), dtype=torch.float64, device=x.device)
    if bool((eps_t < 0).any()) or not bool(torch.isfinite(eps_t).all()):
        raise UsageError("eps must be finite and >= 0")
    xa = x_adv.detach()
    device = model_device(model)
    ok = torch.zeros(n, dtype=torch.bool, device=x.device)
    wrong = torch.zeros(n, dtype=torch.bool, device=x.device)
    with attack_mode(model), torch.no_grad():
        for s in range(0, n, batch_size):  # per batch: never a float64 copy of the whole set
            flat = xa[s : s + batch_size].flatten(1)
            in_box = torch.isfinite(flat).all(1) & (flat >= 0).all(1) & (flat <= 1).all(1)
            dist = lp_norm(flat.double() - x[s : s + batch_size].detach().flatten(1).double(), norm)
            ok[s : s + batch_size] = in_box & (dist <= eps_t[s : s + batch_size] * (1 + tol) + tol)
            xb = torch.nan_to_num(xa[s : s + batch_size]).to(device)
            logits = model(xb)
            tb = None if target is None else target[s : s + batch_size].to(device)
            wrong[s : s + batch_size] = is_success(logits, y[s : s + batch_size].to(device), tb).to(x.device)
    return ok & wrong


def attack_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
    """Per-sample loss an attack maximises: CE(logits, y), or -CE(logits, target) when targeted."""
    if target is not None:
        return -torch.nn.functional.cross_entropy(logits, target, reduction="none")
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def loss_gradient(
    model: nn.Module,
    x_adv: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor | None,
    eot_iter: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradient of :func:`attack_loss` (averaged over ``eot_iter`` passes: EOT) and the last logits."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv)
        grad = attack_gradient(attack_loss(logits, y, target), x_adv)
        for _ in range(eot_iter - 1):
            logits = model(x_adv)
            grad = grad + attack_gradient(attack_loss(logits, y, target), x_adv)
    return grad / eot_iter, logits.detach()


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"],
                  "tuple[torch.Tensor, torch.Tensor | None]"]


def iterate_with_early_exit(
    model: nn.Module,
    idx: torch.Tensor,
    x0: torch.Tensor,
    y0: torch.Tensor,
    t0: torch.Tensor | None,
    x_adv: torch.Tensor,
    eps_t: torch.Tensor,
    *,
    steps: int,
    eot_iter: int,
    step_fn: StepFn,
    best: torch.Tensor,
    found: torch.Tensor,
    state: torch.Tensor | None = None,
) -> None:
    """The iterative-attack loop shared by PGD and MI-FGSM, with per-sample early exit.

    Rows ``idx`` of the batch (clean ``x0``, labels ``y0``, targets ``t0``) start at
    ``x_adv``. Each of ``steps`` iterations takes one loss gradient, then
    ``x_adv, state = step_fn(x_adv, grad, x0, eps_t, state)`` (``state``: optional
    per-sample rows, e.g. a momentum). Every iterate, and the final point (one more
    forward pass), is checked: a sample is written to ``best[idx]`` and marked in
    ``found`` at its first adversarial iterate and leaves the batch.
    """
    for step in range(steps + 1):
        if step < steps:
            grad, logits = loss_gradient(model, x_adv, y0, t0, eot_iter)
        else:
            with torch.no_grad():
                logits = model(x_adv)
        succ = is_success(logits, y0, t0)
        if bool(succ.any()):
            best[idx[succ]] = x_adv[succ]
            found[idx[succ]] = True
            keep = ~succ
            idx, x0, y0, x_adv, eps_t = idx[keep], x0[keep], y0[keep], x_adv[keep], eps_t[keep]
            t0 = None if t0 is None else t0[keep]
            state = None if state is None else state[keep]
            if step < steps:
                grad = grad[keep]
            if idx.numel() == 0:
                return
        if step < steps:
            x_adv, state = step_fn(x_adv, grad, x0, eps_t, state)

