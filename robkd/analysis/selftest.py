"""Attack self-test: the binarization test of Zimmermann et al. (NeurIPS 2022).

"Increasing Confidence in Adversarial Robustness Evaluations" asks whether an
attack finds adversarial examples *where they are known to exist*. For each clean
sample ``x`` the model's classification head is replaced by a binary linear
readout on the model's own features (the input of its last ``nn.Linear``):

* class 0 ("inner"): ``x`` itself and ``n_inner`` points drawn uniformly from the
  ball of radius ``0.95 eps`` around ``x`` (clipped to [0,1]);
* class 1 ("boundary"): one point ``x_b`` on the ball: for Linf a random vertex
  ``x + eps * s`` (``s`` a random sign vector, the paper's ``sample from corners``
  option), for L2 a random direction scaled to ``eps``; clipped to [0,1], so
  ``x_b`` is always a valid point of the threat model.

The readout is ``w . f(z) + b`` with ``w`` the difference between the boundary
feature and the mean inner feature, and the threshold ``b`` half-way between the
boundary point's score and the highest inner score; when that direction does not
separate the two classes, a logistic regression on the features is fitted
instead. A sample whose readout does not classify every inner point as 0 and
``x_b`` as 1 is *invalid* (the paper's "perfect separation" requirement) and is
left out of the rate. For a valid sample the binarised model predicts 0 at ``x``
and 1 at ``x_b``, a point of the ball: an adversarial example provably exists,
and an attack that is working should find one. The result per attack is the
fraction of valid samples on which the attack found an adversarial example
(re-checked with a plain forward pass), with counts.

robkd's reading and simplifications: features are the last ``nn.Linear``'s input
(the paper uses the penultimate layer too); the readout is fitted on one
boundary point (the paper's default ``n_boundary_points=1``) and ``n_inner``
inner points (the paper uses up to 9999; fewer suffice to make the readout
reject the ball's interior along the chosen direction); logits are
``[0, w . f + b]`` plus two never-winning logits ``min(0, w . f + b) - 1`` and
``- 2``, so that DLR losses (three classes; targeted: four) and AutoAttack apply. The samples share one binarised model that routes each input
to the readout of the nearest clean sample (balls of different samples never
overlap when the samples are more than ``2 eps`` apart; samples closer than that
are tested in separate groups), so attacks run batched.

A rate below :data:`SELFTEST_THRESHOLD` (0.9) marks the attack as unable to find
adversarial examples that exist (a sign of gradient masking or a misconfigured
attack); the paper treats any failure as suspicious, 0.9 leaves room for one
hard sample in ten.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import torch
from torch import nn

from robkd.attacks._geometry import lp_norm
from robkd.attacks.base import verify_adversarial
from robkd.attacks.noise import SampleNoise
from robkd.attacks.registry import make_attack
from robkd.errors import UsageError
from robkd.types import Norm
from robkd.utils.modules import eval_mode, model_device
from robkd.utils.validate import check_int

log = logging.getLogger(__name__)

__all__ = ["SELFTEST_THRESHOLD", "SelfTestResult", "attack_self_test", "BinarizedModel"]

#: a self-test success rate below this marks an attack as unreliable
SELFTEST_THRESHOLD = 0.9
#: inner points are drawn from the ball of this fraction of eps (the paper's eta)
INNER_FRACTION = 0.95


@dataclasses.dataclass
class SelfTestResult:
    """Per attack: ``found`` adversarial examples among ``valid`` binarised samples; ``rate = found / valid``.

    ``invalid``: samples whose readout could not separate inner and boundary points (left out);
    ``per_sample``: ``{attack: [bool | None]}`` (None = invalid sample).
    """

    norm: Norm
    eps: float
    n: int
    valid: int
    found: dict[str, int]
    per_sample: dict[str, list[Any]]
    threshold: float = SELFTEST_THRESHOLD

    @property
    def rates(self) -> dict[str, float]:
        return {a: (f / self.valid if self.valid else float("nan")) for a, f in self.found.items()}

    @property
    def flagged(self) -> list[str]:
        """Attacks whose rate is below the threshold (none when no sample was valid)."""
        return [a for a, r in self.rates.items() if self.valid and r < self.threshold]

    def to_dict(self) -> dict[str, Any]:
        return {
            "test": "binarization (Zimmermann et al., NeurIPS 2022)",
            "norm": self.norm.value,
            "eps": self.eps,
            "n": self.n,
            "valid": self.valid,
            "invalid": self.n - self.valid,
            "threshold": self.threshold,
            "attacks": {a: {"found": self.found[a], "valid": self.valid, "rate": self.rates[a]} for a in self.found},
            "flagged": self.flagged,
            "per_sample": self.per_sample,
        }


def _last_linear(model: nn.Module) -> nn.Linear:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise UsageError("the attack self-test needs a model whose classification head is an nn.Linear layer")
    return last


class _FeatureTap:
    """Captures the input of the head (features) and the head's output during a forward pass."""

    def __init__(self, head: nn.Linear) -> None:
        self.features: "torch.Tensor | None" = None
        self.output: "torch.Tensor | None" = None
        self.handle = head.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.features, self.output = inputs[0], output

    def close(self) -> None:
        self.handle.remove()


def features_of(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The head's input features ``(N, D)`` (no gradient), checking that the head's output is the model's."""
    tap = _FeatureTap(_last_linear(model))
    out = []
    try:
        with torch.no_grad():
            for s in range(0, x.shape[0], batch_size):
                logits = model(x[s : s + batch_size])
                if tap.output is None or tap.output.shape != logits.shape or not torch.equal(tap.output, logits):
                    raise UsageError("the attack self-test needs a model whose output is its last nn.Linear layer")
                out.append(tap.features.flatten(1).detach())
    finally:
        tap.close()
    return torch.cat(out)


class BinarizedModel(nn.Module):
    """``model`` with its head replaced by per-sample binary readouts ``[0, w_i . f(z) + b_i]``, plus two logits
    ``min(0, score) - 1`` and ``- 2`` that never win, so that DLR losses (3 classes; targeted: 4) apply.

    An input ``z`` is routed to the readout of the nearest clean sample ``centres[i]`` (in the threat
    model's norm), so attacks can run on batches and on any subset of rows."""

    def __init__(self, model: nn.Module, centres: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: Norm) -> None:
        super().__init__()
        self.model, self.norm = model, norm
        self.register_buffer("centres", centres.detach().clone())
        self.register_buffer("w", w.detach().clone())
        self.register_buffer("b", b.detach().clone())
        self.head = _last_linear(model)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        tap = _FeatureTap(self.head)
        try:
            self.model(z)
            f = tap.features.flatten(1)
        finally:
            tap.close()
        with torch.no_grad():
            d = torch.stack([lp_norm(z.detach() - c.unsqueeze(0), self.norm) for c in self.centres], dim=1)
            k = d.argmin(dim=1)
        score = (f * self.w[k]).sum(dim=1) + self.b[k]
        zero = torch.zeros_like(score)
        low = torch.minimum(zero, score)
        # two never-winning logits keep DLR losses defined (they need 3 classes, the targeted one 4)
        return torch.stack([zero, score, low - 1.0, low - 2.0], dim=1)


def _boundary_and_inner(x: torch.Tensor, norm: Norm, eps: float, n_inner: int, noise: SampleNoise) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the boundary point ``(N, ...)`` and ``n_inner`` inner points ``(N, n_inner, ...)``."""
    shape = tuple(x.shape[1:])
    if norm is Norm.LINF:
        signs = torch.where(noise.rand(x.shape, dtype=x.dtype) < 0.5, -1.0, 1.0).to(x.device)
        xb = x + eps * signs
        inner = x.unsqueeze(1) + (noise.rand((x.shape[0], n_inner) + shape, dtype=x.dtype).to(x.device) * 2 - 1) \
            * INNER_FRACTION * eps
    else:
        d = noise.randn(x.shape, dtype=x.dtype).to(x.device)
        xb = x + eps * d / lp_norm(d, Norm.L2).clamp_min(1e-12).view((-1,) + (1,) * len(shape))
        g = noise.randn((x.shape[0], n_inner) + shape, dtype=x.dtype).to(x.device)
        gn = g.flatten(2).norm(dim=2).clamp_min(1e-12)
        u = noise.rand((x.shape[0], n_inner), dtype=x.dtype).to(x.device) ** (1.0 / max(1, x[0].numel()))
        inner = x.unsqueeze(1) + (g / gn.view(gn.shape + (1,) * len(shape))) * (u * INNER_FRACTION * eps).view(
            u.shape + (1,) * len(shape))
    return xb.clamp(0, 1), inner.clamp(0, 1)


def _fit_readout(f_in: torch.Tensor, f_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """A linear readout scoring ``f_b`` above every row of ``f_in``: (w, b, separated)."""
    w = f_b - f_in.mean(dim=0)
    s_in, s_b = f_in @ w, f_b @ w
    if float(s_b) > float(s_in.max()):
        return w, -(s_b + s_in.max()) / 2, True
    # fallback: logistic regression on standardised features, boundary point up-weighted
    feats = torch.cat([f_in, f_b.unsqueeze(0)]).double()
    mu, sd = feats.mean(0), feats.std(0).clamp_min(1e-6)
    z = (feats - mu) / sd
    t = torch.cat([torch.zeros(f_in.shape[0]), torch.ones(1)]).double()
    weight = torch.cat([torch.ones(f_in.shape[0]), torch.full((1,), float(f_in.shape[0]))]).double()
    wv = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    bv = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([wv, bv], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (weight * nn.functional.binary_cross_entropy_with_logits(z @ wv + bv, t, reduction="none")).mean()
        loss = loss + 1e-4 * (wv * wv).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w2 = (wv.detach() / sd).to(f_in.dtype)
    b2 = (bv.detach() - (wv.detach() * mu / sd).sum()).to(f_in.dtype)
    s_in, s_b = f_in @ w2 + b2, f_b @ w2 + b2
    ok = float(s_b) > float(s_in.max())
    return w2, (b2 - (s_b + s_in.max()) / 2 if ok else b2), ok


def _groups(x: torch.Tensor, norm: Norm, eps: float) -> list[list[int]]:
    """Partition sample indices so that the balls (radius eps) within a group are disjoint."""
    groups: list[list[int]] = []
    for i in range(x.shape[0]):
        for g in groups:
            d = lp_norm(x[g] - x[i].unsqueeze(0), norm)
            if bool((d > 2 * eps * (1 + 1e-6) + 1e-9).all()):
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def attack_self_test(
    model: nn.Module,
    x: torch.Tensor,
    y: "torch.Tensor | None",
    attacks: Sequence[str],
    norm: "Norm | str",
    eps: float,
    n: int = 20,
    seed: int = 0,
    *,
    n_inner: int = 64,
    attack_options: "dict[str, Any] | None" = None,
) -> SelfTestResult:
    """Run the binarization test for each attack spec (``"pgd-20"``, ``"apgd-ce"``...) on the first ``n``
    samples of ``x`` at radius ``eps``; returns per-attack found/valid counts and rates.

    ``y`` is accepted for symmetry with the other analyses and only validated: the binarised task is
    the same for every label. ``attack_options`` go to :func:`robkd.attacks.make_attack` (``seed``
    defaults to ``seed``)."""
    from robkd.analysis.llm import check_eps, check_model

    model = check_model(model)
    norm = Norm.parse(norm)
    eps = check_eps(eps)
    if eps == 0.0:
        raise UsageError("the attack self-test needs eps > 0")
    n = check_int(n, "n", 1)
    n_inner = check_int(n_inner, "n_inner", 1)
    if isinstance(attacks, str):
        attacks = [attacks]
    if not attacks:
        raise UsageError("attacks must name at least one attack spec")
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.dim() < 2 or x.shape[0] == 0:
        raise UsageError("x must be a non-empty floating-point tensor (N, ...) in [0,1]")
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
        raise UsageError(f"y must be None or a label tensor of length {x.shape[0]}")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise UsageError("x must lie in [0,1] pixel space (normalisation belongs inside the model)")
    opts = {"seed": seed, **(attack_options or {})}
    built = {spec: make_attack(spec, norm, eps, **opts) for spec in attacks}  # bad specs fail before any work
    device = model_device(model)
    xs = x[:n].detach().to(device)
    m = xs.shape[0]
    noise = SampleNoise(int(seed), list(range(m)), device=device)
    with eval_mode(model):
        xb, inner = _boundary_and_inner(xs, norm, eps, n_inner, noise)
        f_x = features_of(model, xs)
        f_b = features_of(model, xb)
        f_in = features_of(model, inner.flatten(0, 1)).view(m, n_inner, -1)
        ws, bs, valid = [], [], []
        for i in range(m):
            w, b, ok = _fit_readout(torch.cat([f_x[i : i + 1], f_in[i]]), f_b[i])
            ws.append(w)
            bs.append(b)
            valid.append(ok)
    valid_t = torch.tensor(valid, dtype=torch.bool)
    found: dict[str, int] = {}
    per_sample: dict[str, list[Any]] = {}
    idx_valid = valid_t.nonzero().flatten().tolist()
    for spec, attack in built.items():
        hit = torch.zeros(m, dtype=torch.bool)
        for group in _groups(xs[idx_valid], norm, eps) if idx_valid else []:
            rows = [idx_valid[j] for j in group]
            bin_model = BinarizedModel(model, xs[rows], torch.stack([ws[r] for r in rows]),
                                       torch.stack([bs[r] for r in rows]), norm)
            zeros = torch.zeros(len(rows), dtype=torch.long, device=device)
            out = attack.run(bin_model, xs[rows], zeros, sample_ids=torch.tensor(rows))
            ok = verify_adversarial(bin_model, xs[rows], out.x_adv.to(device), zeros, norm, eps)
            hit[torch.tensor(rows)] = ok.cpu()
        found[spec] = int(hit[valid_t].sum())
        per_sample[spec] = [bool(hit[i]) if valid[i] else None for i in range(m)]
    result = SelfTestResult(norm=norm, eps=eps, n=m, valid=int(valid_t.sum()), found=found, per_sample=per_sample)
    if result.valid < m:
        log.info("attack self-test: %d of %d samples had no separating readout and were left out", m - result.valid, m)
    return result
