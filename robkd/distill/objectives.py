"""Training objectives: one function per method, ``objective(ctx, x, y, idx) -> (loss, terms)``.

``terms`` maps each loss term's name to its (weighted) value as a float, for the
progress bar and the log. The teacher is frozen (eval mode, no parameter
gradients); the training-time attack runs on the student in eval mode unless
``attack_train_mode`` (the ARD reference behaviour, which also updates
BatchNorm statistics during the attack).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from robkd.distill import losses as L
from robkd.errors import ModelRuntimeError, UsageError

Objective = Callable[["StepContext", torch.Tensor, torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]


@dataclasses.dataclass
class StepContext:
    """What an objective needs: the models, the resolved config, the attack RNG and the teacher cache."""

    student: torch.nn.Module
    teacher: torch.nn.Module | None
    config: "object"
    attack_gen: torch.Generator
    teacher_cache: "TeacherCache | None" = None
    #: under DDP, ``(start, stop, total)``: this rank's rows of the global batch (random starts are drawn for
    #: the global batch and sliced, so ranks differ and every sample starts as in one process)
    batch_part: "tuple[int, int, int] | None" = None
    #: the pass being trained (0-based) and the passes of the run: IAD's warm-up reads them
    epoch: int = 0
    passes: int = 1
    #: the fraction of the run's optimizer steps done, this one included, ``(k + 1) / K``: IGDM's ramp reads it
    progress: float = 1.0
    #: the training attack's radius and step are ``eps * eps_scale`` (< 1 during ``eps_warmup``)
    eps_scale: float = 1.0

    @property
    def eps(self) -> float:
        """The training attack's radius at this step (``config.eps`` after the warm-up)."""
        return self.config.eps * self.eps_scale if self.eps_scale != 1.0 else self.config.eps

    @property
    def step_size(self) -> float:
        """The training attack's step at this step (``config.step_size`` after the warm-up)."""
        return self.config.step_size * self.eps_scale if self.eps_scale != 1.0 else self.config.step_size

    @property
    def attack_model(self) -> torch.nn.Module:
        """The student for attack passes: the plain module, also when training under DistributedDataParallel
        (attack passes take input gradients only and must not arm DDP's gradient synchronisation)."""
        from robkd.distributed.ddp import unwrap

        return unwrap(self.student)

    # ----------------------------------------------------------------- attacks
    def _attack(self, loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, random_start: str) -> torch.Tensor:
        from robkd.attacks._geometry import BatchSlice
        from robkd.attacks.pgd import projected_gradient_ascent

        c = self.config
        was = self.student.training
        self.student.train(bool(c.attack_train_mode))
        gen = BatchSlice(self.attack_gen, *self.batch_part) if self.batch_part is not None else self.attack_gen
        try:
            return projected_gradient_ascent(
                loss_fn, x, norm=c.norm, eps=self.eps, steps=c.steps, step_size=self.step_size,
                random_start=random_start, generator=gen,
            )
        finally:
            self.student.train(was)

    def pgd_ce(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD-k on the student's CE w.r.t. the true label, uniform random start (Madry / ARD)."""
        model = self.attack_model
        return self._attack(lambda z: L.cross_entropy(model(z), y, reduction="none"), x, "uniform")

    def pgd_trades(self, x: torch.Tensor) -> torch.Tensor:
        """TRADES inner max of KL(S(x) || S(x+d)) from x + 0.001 N(0, 1)."""
        c = self.config
        was = self.student.training
        self.student.train(bool(c.attack_train_mode))
        model = self.attack_model
        with torch.no_grad():
            nat = model(x).detach()
        self.student.train(was)
        return self._attack(lambda z: L.trades_kl(nat, model(z), reduction="none"), x, "normal:0.001")

    def pgd_rslad(self, x: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """RSLAD inner max of KL(T(x) || S(x+d)) (the teacher's clean soft label is the target) from x + 0.001 N(0, 1)."""
        model = self.attack_model
        t = teacher_logits.detach()
        return self._attack(lambda z: L.kl_divergence(t, model(z), reduction="none"), x, "normal:0.001")

    def pgd_adaad(self, x: torch.Tensor) -> torch.Tensor:
        """AdaAD inner max of KL(T(x+d) || S(x+d)) from x + 0.001 N(0, 1): the teacher is queried (and
        differentiated with respect to its input) at every step."""
        model, teacher = self.attack_model, self.teacher
        return self._attack(lambda z: L.kl_divergence(teacher(z), model(z), reduction="none"), x, "normal:0.001")

    # ----------------------------------------------------------------- teacher
    def teacher_logits(self, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """Teacher logits on clean ``x`` (from the cache when it is valid)."""
        if self.teacher_cache is not None and idx is not None:
            return self.teacher_cache.logits(idx)
        with torch.no_grad():
            return self.teacher(x).detach()

    def teacher_grad(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher per-sample CE input gradients and logits on ``x`` (cached for clean inputs)."""
        if self.teacher_cache is not None and idx is not None and self.teacher_cache.has_grads:
            return self.teacher_cache.grads(idx), self.teacher_cache.logits(idx)
        return L.input_gradient(self.teacher, x, y, create_graph=False)

    def iga(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(IGA term, student logits with graph, teacher logits) on ``x``; double backprop on the student side."""
        g_s, s_logits = L.input_gradient(self.student, x, y, create_graph=True)
        g_t, t_logits = self.teacher_grad(x, y, idx)
        return L.iga_term(g_s, g_t, self.config.iga_form), s_logits, t_logits


def nonfinite_teacher(bad: int, n: int, where: str, what: str = "outputs") -> ModelRuntimeError:
    """The error for a teacher whose ``what`` are NaN/inf on ``bad`` of ``n`` images (``where``): not distillable."""
    return ModelRuntimeError(f"the teacher's {what} are non-finite (NaN/inf) on {bad} of {n} {where}: "
                             f"a NaN/inf teacher cannot be distilled")


class TeacherCache:
    """Teacher logits (and per-sample input gradients) on the clean, un-augmented training set.

    Filled once, in fixed chunks of the dataset order, so results do not depend
    on the batch order (a resumed run sees exactly the same values). The values
    are computed and held on ``device`` (default: the teacher's device); lookups
    accept indices on any device. A teacher whose logits or input gradients are
    NaN/inf on any training sample is a :class:`robkd.errors.ModelRuntimeError`.
    """

    def __init__(self, teacher: torch.nn.Module, data, *, grads: bool, chunk: int = 256,
                 device: "torch.device | str | None" = None) -> None:
        if device is None:
            first = next(iter(teacher.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        n = len(data)
        logits, gs = [], []
        for s in range(0, n, chunk):
            x = data.float_x(slice(s, s + chunk)).to(device)
            y = data.y[s : s + chunk].to(device)
            if grads:
                g, lg = L.input_gradient(teacher, x, y, create_graph=False)
                gs.append(g)
            else:
                with torch.no_grad():
                    lg = teacher(x)
            logits.append(lg.detach())
        self._logits = torch.cat(logits)
        self._grads = torch.cat(gs) if grads else None
        bad = ~torch.isfinite(self._logits.flatten(1)).all(1)
        if self._grads is not None:
            bad |= ~torch.isfinite(self._grads.flatten(1)).all(1)
        if bool(bad.any()):
            raise nonfinite_teacher(int(bad.sum()), n, "training images",
                                    "outputs or input gradients" if self._grads is not None else "outputs")

    @property
    def has_grads(self) -> bool:
        return self._grads is not None

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Cached teacher logits of the samples ``idx`` (dataset positions)."""
        return self._logits[idx.to(self._logits.device)]

    def grads(self, idx: torch.Tensor) -> torch.Tensor:
        """Cached teacher input gradients of the samples ``idx``."""
        if self._grads is None:
            raise RuntimeError("this teacher cache holds no input gradients")
        return self._grads[idx.to(self._grads.device)]


# --------------------------------------------------------------------------- objectives
def obj_st(ctx: StepContext, x, y, idx):
    """ST: CE(S(x), y)."""
    ce = L.cross_entropy(ctx.student(x), y)
    return ce, {"ce": ce.item()}


def obj_at(ctx: StepContext, x, y, idx):
    """PGD-AT (Madry): CE(S(x_adv), y)."""
    x_adv = ctx.pgd_ce(x, y)
    ce = L.cross_entropy(ctx.student(x_adv), y)
    return ce, {"ce_adv": ce.item()}


def obj_trades(ctx: StepContext, x, y, idx):
    """TRADES: CE(S(x), y) + beta * KL(S(x) || S(x_adv)) (batchmean)."""
    x_adv = ctx.pgd_trades(x)
    nat = ctx.student(x)
    ce = L.cross_entropy(nat, y)
    kl = ctx.config.beta * L.trades_kl(nat, ctx.student(x_adv))
    return ce + kl, {"ce": ce.item(), "kl_rob": kl.item()}


def obj_kd(ctx: StepContext, x, y, idx):
    """KD: lambda_ce CE(S(x), y) + lambda_kl tau^2 KL(T(x)/tau || S(x)/tau)."""
    c = ctx.config
    s = ctx.student(x)
    t = ctx.teacher_logits(x, idx)
    ce = c.lambda_ce * L.cross_entropy(s, y)
    kl = c.lambda_kl * L.distillation_kl(s, t, c.temperature)
    return ce + kl, {"ce": ce.item(), "kl": kl.item()}


def ard_terms(ctx: StepContext, x, y, idx):
    """ARD's ``(loss, terms, x_adv, T(x))``: alpha tau^2 KL(T(x)/tau || S(x_adv)/tau) + (1 - alpha) CE(S(x), y)."""
    c = ctx.config
    x_adv = ctx.pgd_ce(x, y)
    t = ctx.teacher_logits(x, idx)
    kl = c.alpha * L.distillation_kl(ctx.student(x_adv), t, c.temperature)
    loss, terms = kl, {"kl_adv": kl.item()}
    if c.alpha < 1:
        ce = (1 - c.alpha) * L.cross_entropy(ctx.student(x), y)
        loss = loss + ce
        terms["ce"] = ce.item()
    return loss, terms, x_adv, t


def obj_ard(ctx: StepContext, x, y, idx):
    """ARD: alpha tau^2 KL(T(x)/tau || S(x_adv)/tau) + (1 - alpha) CE(S(x), y); teacher sees clean x."""
    loss, terms, _, _ = ard_terms(ctx, x, y, idx)
    return loss, terms


def obj_kdiga(ctx: StepContext, x, y, idx):
    """KDIGA: lambda_ce CE(S(x), y) + lambda_kl tau^2 KL(T(x)/tau || S(x)/tau) + lambda_iga IGA(x)."""
    c = ctx.config
    iga, s, t = ctx.iga(x, y, idx)
    ce = c.lambda_ce * L.cross_entropy(s, y)
    kl = c.lambda_kl * L.distillation_kl(s, t, c.temperature)
    ig = c.lambda_iga * iga
    return ce + kl + ig, {"ce": ce.item(), "kl": kl.item(), "iga": ig.item()}


def obj_kdiga_ardc(ctx: StepContext, x, y, idx):
    """KDIGA-ARDC: lambda_ce CE(S(x)) + lambda_kl tau^2 KL(T(x)/tau || S(x_adv)/tau) + lambda_iga IGA(x)."""
    c = ctx.config
    x_adv = ctx.pgd_ce(x, y)
    iga, s, t = ctx.iga(x, y, idx)
    ce = c.lambda_ce * L.cross_entropy(s, y)
    kl = c.lambda_kl * L.distillation_kl(ctx.student(x_adv), t, c.temperature)
    ig = c.lambda_iga * iga
    return ce + kl + ig, {"ce": ce.item(), "kl_adv": kl.item(), "iga": ig.item()}


def obj_kdiga_arda(ctx: StepContext, x, y, idx):
    """KDIGA-ARDA: lambda_ce CE(S(x)) + lambda_kl tau^2 KL(T(x_adv)/tau || S(x_adv)/tau) + lambda_iga IGA(x_adv)."""
    c = ctx.config
    x_adv = ctx.pgd_ce(x, y)
    iga, s_adv, t_adv = ctx.iga(x_adv, y, None)
    ce = c.lambda_ce * L.cross_entropy(ctx.student(x), y)
    kl = c.lambda_kl * L.distillation_kl(s_adv, t_adv, c.temperature)
    ig = c.lambda_iga * iga
    return ce + kl + ig, {"ce": ce.item(), "kl_adv": kl.item(), "iga_adv": ig.item()}


OBJECTIVES: dict[str, Objective] = {
    "st": obj_st,
    "at": obj_at,
    "trades": obj_trades,
    "kd": obj_kd,
    "ard": obj_ard,
    "kdiga": obj_kdiga,
    "kdiga-ardc": obj_kdiga_ardc,
    "kdiga-arda": obj_kdiga_arda,
}


def get_objective(method: str) -> Objective:
    """The objective function of a seed ``method`` (Fast-ARD is a training loop, see :class:`robkd.distill.Trainer`;
    RSLAD, IAD, AdaAD and IGDM: :func:`robkd.distill.recent_objectives.objective_for`)."""
    try:
        return OBJECTIVES[method]
    except KeyError:
        raise UsageError(f"no per-batch objective for method {method!r}; known: {', '.join(OBJECTIVES)}") from None


def fast_ard_replay(ctx: StepContext, x: torch.Tensor, y: torch.Tensor, idx, delta: torch.Tensor,
                    teacher_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """One Fast-ARD replay ("free" training): returns ``(loss, terms, new_delta)``.

    One forward pass of the student at ``x + delta`` (student in train mode);
    ``loss.backward()`` by the caller gives the parameter gradients, and the
    *same* backward pass gives the input gradient used to update ``delta``:
    ``delta <- Proj(delta + step * sign(grad_x loss))`` onto the eps-ball and
    [0,1]. The perturbation ascends the training loss itself (that is what lets
    one backward pass serve both updates); it persists across replays and
    batches. Objective: alpha tau^2 KL(T(x)/tau || S(x+delta)/tau) + (1-alpha) CE(S(x), y).
    The returned ``new_delta`` reads ``x_in.grad``, so it is computed lazily by
    :func:`fast_ard_update_delta` after the caller's backward. ``teacher_logits``: ``T(x)`` when the
    caller already has it (the teacher sees the same clean ``x`` in every replay, so the trainer computes
    it once per minibatch, not ``m`` times).
    """
    c = ctx.config
    x_in = (x + delta).clamp(0.0, 1.0).detach().requires_grad_(True)
    t = ctx.teacher_logits(x, idx) if teacher_logits is None else teacher_logits
    kl = c.alpha * L.distillation_kl(ctx.student(x_in), t, c.temperature)
    loss, terms = kl, {"kl_adv": kl.item()}
    if c.alpha < 1:
        ce = (1 - c.alpha) * L.cross_entropy(ctx.student(x), y)
        loss = loss + ce
        terms["ce"] = ce.item()
    return loss, terms, x_in


def fast_ard_update_delta(ctx: StepContext, x: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """``delta`` after one free step, from ``x_in.grad`` filled by the caller's backward pass."""
    from robkd.attacks._geometry import ascent_direction, per_sample, project
    from robkd.types import Norm

    c = ctx.config
    norm = Norm.parse(c.norm)
    g = x_in.grad if x_in.grad is not None else torch.zeros_like(x_in)
    g = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    eps = per_sample(ctx.eps, x)
    step = per_sample(ctx.step_size, x)
    x_new = project(x_in.detach() + step * ascent_direction(g, norm), x, norm, eps)
    return (x_new - x).detach()
