"""The evaluation sanity checks themselves: signs that an adversarial evaluation is unreliable.

Each check returns a list of :class:`SanityFlag` (empty when nothing is wrong); the caller (the audit)
decides what a flag means, e.g. a failure under ``--strict``. :mod:`robkd.analysis.sanity` is the entry
point (it re-exports everything here and plans the checks of an audit).

Cheap checks (no attack): :func:`check_randomness`, :func:`check_probability_outputs`,
:func:`check_gradients` (grouped in :func:`pre_checks`), and :func:`check_clean_accuracy` (from the
clean predictions alone).
Checks on a finished :class:`~robkd.attacks.SuiteResult`: :func:`check_result` (black-box beating
white-box, robust accuracy rising with the radius).
Stand-alone checks running extra attacks on a subset: :func:`check_large_radius`,
:func:`check_more_steps`, :func:`check_radius_monotonicity`, :func:`check_blackbox_subset`; the audit
runs the first, second and fourth through :mod:`robkd.analysis.sanity_reuse`, which starts from the
suite's per-sample outcomes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import torch
from torch import nn

from robkd.attacks.base import attack_mode, check_inputs
from robkd.utils.modules import model_device
from robkd.errors import UsageError
from robkd.types import Norm, format_radius
from robkd.utils.logits import correct

#: attacks that use no gradient
BLACK_BOX = {"square"}
#: suite specs that run Square inside pyautoattack's own cascade: their result cannot say which component
#: broke a sample, so :func:`check_result` cannot compare Square with the white-box components and
#: :func:`check_blackbox_subset` runs that comparison separately
HIDDEN_BLACK_BOX = {"autoattack", "autoattack-plus"}


@dataclasses.dataclass
class SanityFlag:
    """One reason to distrust an evaluation: ``code``, what was seen, what it suggests, which model."""

    code: str
    message: str
    suggestion: str
    model: str | None = None
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return dataclasses.asdict(self)


def _subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= x.shape[0]:
        return x, y
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return x[idx.to(x.device)], y[idx.to(y.device)]


def _logits(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    device = model_device(model)
    with attack_mode(model), torch.no_grad():
        return torch.cat([model(x[s : s + batch_size].to(device)).float().cpu() for s in range(0, x.shape[0], batch_size)])


def check_randomness(model: nn.Module, x: torch.Tensor, *, name: str | None = None, passes: int = 3,
                     tol: float = 1e-5) -> list[SanityFlag]:
    """Flag ``stochastic-outputs`` when repeated eval-mode forward passes on the same input differ."""
    outs = [_logits(model, x) for _ in range(max(2, passes))]
    scale = max(1.0, float(outs[0].abs().max()))
    diff = max(float((o - outs[0]).abs().max()) for o in outs[1:])
    if diff > tol * scale:
        return [SanityFlag(
            "stochastic-outputs",
            f"the model's outputs change between identical forward passes in eval mode (max |diff| = {diff:.3g})",
            "a randomised model: gradient attacks see a noisy gradient; evaluate with EOT "
            "(eot_iter > 1, or autoattack-rand) and report the randomness",
            name, diff)]
    return []


def check_probability_outputs(model: nn.Module, x: torch.Tensor, *, name: str | None = None,
                              tol: float = 1e-4) -> list[SanityFlag]:
    """Flag ``probability-outputs`` when the outputs look like softmax rows (non-negative, summing to 1)."""
    out = _logits(model, x)
    if out.dim() == 2 and bool((out >= -tol).all()) and bool(((out.sum(1) - 1).abs() <= tol).all()):
        return [SanityFlag(
            "probability-outputs",
            "the model outputs probabilities (rows are non-negative and sum to 1), not logits",
            "attack losses on probabilities saturate (vanishing gradients: a form of gradient masking); "
            "remove the final softmax so the evaluation sees logits",
            name)]
    return []


def check_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, name: str | None = None,
                    batch_size: int = 256) -> list[SanityFlag]:
    """Flag ``nan-gradients`` and ``zero-gradients`` (input gradient of the CE loss, per sample)."""
    device = model_device(model)
    zero = nan = 0
    with attack_mode(model):
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size].detach().to(device).requires_grad_(True)
            with torch.enable_grad():
                loss = torch.nn.functional.cross_entropy(model(xb), y[s : s + batch_size].to(device), reduction="sum")
                (g,) = torch.autograd.grad(loss, xb, allow_unused=True)
            if g is None:
                zero += xb.shape[0]
                continue
            flat = g.flatten(1)
            bad = ~torch.isfinite(flat).all(1)
            nan += int(bad.sum())
            zero += int(((flat == 0).all(1) & ~bad).sum())
    n = max(1, x.shape[0])
    flags = []
    if nan:
        flags.append(SanityFlag(
            "nan-gradients", f"{nan}/{x.shape[0]} samples have NaN or infinite input gradients",
            "a numerically broken or non-differentiable model: gradient attacks fail silently; "
            "fix the model or evaluate with gradient-free attacks (square)", name, nan / n))
    if zero:
        flags.append(SanityFlag(
            "zero-gradients", f"{zero}/{x.shape[0]} samples have an all-zero input gradient",
            "gradient masking (e.g. a non-differentiable quantiser or saturated outputs): gradient attacks "
            "cannot make progress; use BPDA / a differentiable approximation or black-box attacks", name, zero / n))
    return flags


def pre_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, name: str | None = None,
               n: int | None = 64, seed: int = 0) -> list[SanityFlag]:
    """The cheap checks (no attack): randomness, probability outputs, zero/NaN gradients, on ``n`` samples."""
    check_inputs(model, x, y)
    xs, ys = _subset(x, y, n, seed)
    return (check_randomness(model, xs, name=name) + check_probability_outputs(model, xs, name=name)
            + check_gradients(model, xs, ys, name=name))


#: the near-chance rule of :func:`check_clean_accuracy`: the share of the way from chance (1/K) to a perfect score
NEAR_CHANCE_SHARE = 0.1
#: ... and the one-sided confidence of its upper bound
NEAR_CHANCE_CONFIDENCE = 0.95


def near_chance_level(num_classes: int) -> float:
    """The accuracy ``1/K + 0.1 (1 - 1/K)`` below which a model counts as near chance (19% for 10 classes)."""
    return 1.0 / num_classes + NEAR_CHANCE_SHARE * (1.0 - 1.0 / num_classes)


def check_clean_accuracy(is_correct: torch.Tensor, num_classes: int, *, name: str | None = None) -> list[SanityFlag]:
    """Flag ``near-chance-clean-accuracy`` when the clean accuracy is, with 95% confidence, near chance.

    ``is_correct``: per audited sample, classified correctly without perturbation. With ``k`` of ``n``
    correct and ``K`` classes the flag fires when the one-sided 95% Clopper-Pearson upper bound of the
    accuracy lies below :func:`near_chance_level` ``= 1/K + 0.1 (1 - 1/K)`` (a tenth of the way from
    chance to a perfect score: 19% for 10 classes, 55% for 2, 10.9% for 100, 10.1% for 1000). So it
    needs evidence: a model that gets every sample wrong is flagged (for K = 10) from n = 15 samples on
    (``1 - 0.05**(1/n) < 0.19``), one at exactly chance from about 60. A model fed wrongly normalised
    inputs, or another dataset's images or label order, typically lands here; its robust accuracies
    mean nothing.
    """
    from robkd.utils.stats import clopper_pearson

    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UsageError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    n = int(is_correct.numel())
    if n == 0:
        return []
    k = int(is_correct.sum())
    upper = clopper_pearson(k, n, 1.0 - 2.0 * (1.0 - NEAR_CHANCE_CONFIDENCE))[1]  # one-sided upper bound
    level = near_chance_level(num_classes)
    if upper >= level:
        return []
    return [SanityFlag(
        "near-chance-clean-accuracy",
        f"clean accuracy {k / n:.1%} ({k}/{n}) is near chance for {num_classes} classes ({1 / num_classes:.1%}): "
        f"its one-sided 95% upper bound {upper:.1%} is below {level:.1%}",
        "a model at chance level is not being evaluated on what it learned: most often the input normalisation "
        "is missing or wrong (pass --mean/--std, mean=/std= in the Python API, or use a checkpoint that records "
        "its normalisation); else the data is not the model's dataset (--data) or its label order differs from "
        "the model's classes. Its robust accuracies mean nothing until this is fixed",
        name, k / n)]


def check_monotone(accuracies: Sequence[float], radii: Sequence[float], *, name: str | None = None,
                   tol: float = 1e-9) -> list[SanityFlag]:
    """Flag ``accuracy-rises-with-radius`` when robust accuracy at a larger radius exceeds a smaller one's."""
    if len(accuracies) != len(radii):
        raise UsageError("accuracies and radii must have the same length")
    pairs = sorted(zip(radii, accuracies))
    for (r0, a0), (r1, a1) in zip(pairs, pairs[1:]):
        if a1 > a0 + tol:
            return [SanityFlag(
                "accuracy-rises-with-radius",
                f"robust accuracy rises from {a0:.2%} at {format_radius(r0)} to {a1:.2%} at {format_radius(r1)}",
                "the attack fails to find examples that exist (a larger ball contains the smaller one): "
                "gradient masking or a too-weak / badly tuned attack", name, a1 - a0)]
    return []


def check_result(result: Any, *, name: str | None = None, square_tol: float = 0.002) -> list[SanityFlag]:
    """Checks on a finished :class:`~robkd.attacks.SuiteResult`: black-box beating white-box, monotonicity.

    ``blackbox-beats-whitebox`` fires when a gradient-free attack (square), run
    after at least one white-box attack, breaks samples the white-box attacks left
    robust amounting to more than ``square_tol`` of ALL audited samples (an absolute
    drop in robust accuracy, as in AutoAttack's own check).
    """
    flags: list[SanityFlag] = []
    order = list(result.order)
    n = max(1, result.n)
    for bb in [a for a in order if a in BLACK_BOX]:
        white_before = [a for a in order[: order.index(bb)] if a not in BLACK_BOX]
        if not white_before:
            continue
        k = result.attacks.index(bb)
        counts = (result.broken_by == k).sum(1)
        ri = int(counts.argmax())
        frac = float(counts[ri]) / n
        if frac > square_tol:
            flags.append(SanityFlag(
                "blackbox-beats-whitebox",
                f"{bb} broke {int(counts[ri])} samples ({frac:.2%}) at radius {format_radius(result.radii[ri])} "
                f"that the white-box attacks ({', '.join(white_before)}) missed",
                "gradient masking: the gradients mislead the white-box attacks; the robust accuracy is "
                "overestimated, use stronger / adaptive attacks", name, frac))
    flags += check_monotone(result.robust_accuracy(), result.radii, name=name)
    return flags


def check_blackbox_subset(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: "Norm | str", eps: float, *,
                          white: Sequence[str] = ("apgd-ce", "apgd-t"), n_queries: int = 1000, tol: float = 0.002,
                          name: str | None = None, seed: int = 0) -> list[SanityFlag]:
    """Flag ``blackbox-beats-whitebox`` from attacks run here: Square on what the white-box attacks left.

    The white-box attacks (default: AutoAttack's APGD-CE and APGD-T, as configured there) run in turn
    on the clean-correct samples still unbroken; Square (gradient-free, ``n_queries`` queries) then
    runs on the samples they all left robust. The flag fires when Square breaks more than ``tol`` of
    the samples (AutoAttack's own threshold). Every adversarial example is re-checked by a forward
    pass. Used for suites whose Square is hidden inside pyautoattack's cascade
    (:data:`HIDDEN_BLACK_BOX`).
    """
    from robkd.attacks import make_attack, verify_adversarial

    norm = Norm.parse(norm)
    clean = correct(_logits(model, x), y.cpu())
    robust = clean.clone()

    def broken(spec: str, rows: torch.Tensor, **kw: Any) -> torch.Tensor:
        r = rows.to(x.device)
        out = make_attack(spec, norm, eps, seed=seed, **kw).run(model, x[r], y[r])
        return (verify_adversarial(model, x[r], out.x_adv, y[r], norm, eps) & out.success).cpu()

    for spec in white:
        rows = robust.nonzero().flatten()
        if rows.numel():
            robust[rows[broken(spec, rows)]] = False
    rows = robust.nonzero().flatten()
    if not rows.numel():
        return []
    k = int(broken("square", rows, n_queries=n_queries).sum())
    frac = k / max(1, x.shape[0])
    if frac > tol:
        return [SanityFlag(
            "blackbox-beats-whitebox",
            f"square ({n_queries} queries) broke {k} of {x.shape[0]} samples ({frac:.2%}) at radius {format_radius(eps)} "
            f"that the white-box attacks ({', '.join(white)}) missed",
            "gradient masking: the gradients mislead the white-box attacks; the robust accuracy is "
            "overestimated, use stronger / adaptive attacks", name, frac)]
    return []


def _robust_accuracy(model, x, y, spec, norm, eps, seed) -> float:
    from robkd.attacks import make_attack, verify_adversarial

    out = make_attack(spec, norm, eps, seed=seed).run(model, x, y)
    ok = verify_adversarial(model, x, out.x_adv, y, norm, eps) & out.success
    with torch.no_grad():
        clean = correct(_logits(model, x), y.cpu())
    return float((clean & ~ok.cpu()).float().mean())


def large_radius_flags(acc: float, attack: str, norm: Norm, eps: float, name: str | None,
                       max_accuracy: float) -> list[SanityFlag]:
    """``large-radius-not-broken`` when ``acc`` (robust accuracy at a radius reaching every image) exceeds the limit."""
    if acc > max_accuracy:
        return [SanityFlag(
            "large-radius-not-broken",
            f"{attack} leaves {acc:.2%} robust accuracy at {norm.value} radius {eps:g}, where every image is reachable",
            "the attack does not work on this model (gradient masking, or an unsuitable evaluation / loss); "
            "the reported robust accuracies are not trustworthy", name, acc)]
    return []


def check_large_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: "Norm | str", *,
                       eps: float | None = None, attack: str = "pgd-20", max_accuracy: float = 0.05,
                       name: str | None = None, seed: int = 0) -> list[SanityFlag]:
    """Flag ``large-radius-not-broken``: at a radius whose ball covers the whole [0,1] box, accuracy must be ~0.

    Default radius: 1.0 for Linf, ``sqrt(d)`` for L2 (both contain every image).
    """
    norm = Norm.parse(norm)
    if eps is None:
        eps = 1.0 if norm is Norm.LINF else math.sqrt(x[0].numel())
    acc = _robust_accuracy(model, x, y, attack, norm, eps, seed)
    return large_radius_flags(acc, attack, norm, eps, name, max_accuracy)


def check_more_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: "Norm | str", eps: float, *,
                     steps: int = 20, factor: int = 10, tol: float = 0.03, name: str | None = None,
                     seed: int = 0) -> list[SanityFlag]:
    """Flag ``more-steps-help`` when PGD with ``factor``x more steps lowers accuracy by more than ``tol``."""
    a = _robust_accuracy(model, x, y, f"pgd-{steps}", norm, eps, seed)
    b = _robust_accuracy(model, x, y, f"pgd-{steps * factor}", norm, eps, seed)
    if a - b > tol:
        return [SanityFlag(
            "more-steps-help",
            f"pgd-{steps * factor} lowers robust accuracy from {a:.2%} (pgd-{steps}) to {b:.2%} "
            f"at {format_radius(eps)}",
            "the attack has not converged: use more steps / restarts or AutoAttack before trusting the figure",
            name, a - b)]
    return []


def check_radius_monotonicity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: "Norm | str",
                              radii: Sequence[float], *, attack: str = "pgd-20", name: str | None = None,
                              seed: int = 0) -> list[SanityFlag]:
    """Run ``attack`` independently at each radius (no inheritance between radii) and check monotonicity.

    (A :class:`~robkd.attacks.Suite` result is monotone by construction; this
    checks the attack itself.)
    """
    accs = [_robust_accuracy(model, x, y, attack, norm, r, seed) for r in radii]
    return check_monotone(accs, list(radii), name=name)
