"""Randomized smoothing: CERTIFY and PREDICT of Cohen, Rosenfeld & Kolter (2019).

The smoothed classifier is ``g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c)`` with
the base classifier ``f`` a :class:`~robkd.models.RobustModel` taking [0,1]
pixels. The Gaussian noise is added in [0,1] pixel space, *without clipping*
the noisy input to [0,1]: the certificate is a statement about exactly this
``g`` (clipping would change the smoothing distribution and void the Gaussian
argument). ``sigma`` is therefore in [0,1]-pixel units.

CERTIFY (per sample): draw ``n0`` noisy copies, take the most frequent class
``c_A``; draw ``n`` fresh copies and count ``c_A``; ``p_A_lower`` is the
one-sided ``(1 - alpha)`` Clopper-Pearson lower confidence bound on
``P(f(x + noise) = c_A)``. Abstain when ``p_A_lower <= 0.5``; otherwise
``g(x) = c_A`` is certified in the L2 ball of radius
``sigma * Phi^{-1}(p_A_lower)``, with probability at least ``1 - alpha`` over
the sampling.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn

from robkd.errors import UsageError
from robkd.utils.logits import NON_FINITE, predict
from robkd.utils.modules import eval_mode
from robkd.utils.stats import clopper_pearson_lower
from robkd.utils.validate import check_int

__all__ = [
    "SmoothingResult",
    "certify_smoothing",
    "clopper_pearson_lower",
    "predict_smoothing",
]


@dataclasses.dataclass
class SmoothingResult:
    """Per-sample CERTIFY outcomes.

    ``prediction`` ``(N,)`` int64, ``-1`` = abstain; ``radius`` ``(N,)`` certified L2
    radius in [0,1]-pixel units (0 when abstaining); ``correct`` ``(N,)`` bool
    (not abstained and ``prediction == y``); ``p_lower`` ``(N,)`` the lower
    confidence bound on ``p_A``; ``count`` ``(N,)`` how many of the ``n`` noisy
    copies the base model assigned to the selected class.
    """

    sigma: float
    n0: int
    n: int
    alpha: float
    seed: int
    prediction: torch.Tensor
    radius: torch.Tensor
    correct: torch.Tensor
    p_lower: torch.Tensor
    count: torch.Tensor
    seconds: float = 0.0

    def __len__(self) -> int:
        return int(self.prediction.shape[0])

    @property
    def abstained(self) -> torch.Tensor:
        """``(N,)`` bool: the smoothed classifier abstained."""
        return self.prediction < 0

    @property
    def abstentions(self) -> int:
        """Number of abstentions."""
        return int(self.abstained.sum())

    def certified_accuracy(self, radius: float) -> float:
        """Fraction of samples predicted correctly with certified L2 radius >= ``radius``."""
        try:
            r = float(radius)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"radius must be a number >= 0, got {radius!r}") from exc
        if not math.isfinite(r) or r < 0:
            raise UsageError(f"radius must be finite and >= 0, got {radius!r}")
        if len(self) == 0:
            return float("nan")
        ok = self.correct & (self.radius >= r)
        return float(ok.double().mean())

    def to_dict(self, radii: "list[float] | None" = None) -> dict[str, Any]:
        """JSON-serialisable: settings, counts, certified accuracy at ``radii``, per-sample lists."""
        out: dict[str, Any] = {
            "method": "randomized-smoothing (Cohen et al. 2019, CERTIFY)",
            "norm": "L2",
            "sigma": self.sigma,
            "n0": self.n0,
            "n": self.n,
            "alpha": self.alpha,
            "seed": self.seed,
            "noise": "Gaussian in [0,1] pixel space, not clipped",
            "samples": len(self),
            "abstentions": self.abstentions,
            "clean_accuracy_smoothed": float(self.correct.double().mean()) if len(self) else float("nan"),
            "seconds": self.seconds,
            "per_sample": {
                "prediction": [int(v) for v in self.prediction.tolist()],
                "radius": [float(v) for v in self.radius.tolist()],
                "correct": [bool(v) for v in self.correct.tolist()],
                "p_lower": [float(v) for v in self.p_lower.tolist()],
                "count": [int(v) for v in self.count.tolist()],
            },
        }
        if radii is not None:
            out["certified_accuracy"] = {repr(float(r)): self.certified_accuracy(r) for r in radii}
        return out


def _check_common(sigma: Any, alpha: Any, batch_size: Any) -> tuple[float, float, int]:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise UsageError(f"sigma must be a finite number > 0, got {sigma!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < alpha < 1.0):
        raise UsageError(f"alpha must be in (0, 1), got {alpha!r}")
    return float(sigma), float(alpha), check_int(batch_size, "batch_size", 1)


def _check_x(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x) or x.dim() < 2 or x.shape[0] == 0:
        raise UsageError("x must be a non-empty floating-point tensor (N, ...) in [0,1]")
    if not bool(torch.isfinite(x).all()) or float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise UsageError("x must lie in [0,1] pixel space (normalisation belongs inside the model)")
    return x.detach()


class _Sampler:
    """Counts the base model's votes on Gaussian-noised copies of one input."""

    def __init__(self, model: nn.Module, sigma: float, batch_size: int, generator: torch.Generator) -> None:
        self.model, self.sigma, self.batch_size, self.gen = model, sigma, batch_size, generator
        self.num_classes: int | None = None

    @torch.no_grad()
    def counts(self, x1: torch.Tensor, num: int) -> torch.Tensor:
        """Class counts ``(K,)`` over ``num`` draws of ``argmax f(x1 + sigma * N(0, I))``."""
        total: torch.Tensor | None = None
        remaining = num
        while remaining > 0:
            b = min(self.batch_size, remaining)
            batch = x1.unsqueeze(0).expand((b,) + tuple(x1.shape))
            noise = torch.randn(batch.shape, generator=self.gen, device=self.gen.device, dtype=x1.dtype).to(x1.device)
            logits = self.model(batch + self.sigma * noise)
            if logits.dim() != 2 or logits.shape[0] != b:
                raise UsageError(f"model must return logits of shape (B, K), got {tuple(logits.shape)}")
            if self.num_classes is None:
                self.num_classes = int(logits.shape[1])
            pred = predict(logits)  # a draw with a non-finite output votes for no class (robkd.utils.logits)
            c = torch.bincount(pred[pred != NON_FINITE], minlength=self.num_classes).cpu()
            total = c if total is None else total + c
            remaining -= b
        if total is None:  # num == 0: no votes
            return torch.zeros(self.num_classes or 0, dtype=torch.long)
        return total


def _generator(x: torch.Tensor, seed: int) -> torch.Generator:
    return torch.Generator(device=x.device if x.device.type != "cpu" else "cpu").manual_seed(int(seed))


def certify_smoothing(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 10000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
) -> SmoothingResult:
    """CERTIFY every sample of ``x`` (N, ...) in [0,1]; see the module docstring.

    Noise is drawn batch by batch from one ``torch.Generator`` seeded with
    ``seed``, so results are reproducible for a given ``batch_size``. The model
    runs in eval mode (restored afterwards) under ``torch.no_grad``.
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sigma, alpha, batch_size = _check_common(sigma, alpha, batch_size)
    n0 = check_int(n0, "n0", 1)
    n = check_int(n, "n", 1)  # n0 and n are independent (Cohen et al.'s CERTIFY): n0 > n is fine
    x = _check_x(x)
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise UsageError(f"y must be a 1-D label tensor of length {x.shape[0]}")
    from scipy.stats import norm as normal

    from robkd.utils.progress import progress_bar, rate_text

    gen = _generator(x, seed)
    sampler = _Sampler(model, sigma, batch_size, gen)
    N = x.shape[0]
    prediction = torch.full((N,), -1, dtype=torch.long)
    radius = torch.zeros(N, dtype=torch.float64)
    p_lower = torch.zeros(N, dtype=torch.float64)
    count = torch.zeros(N, dtype=torch.long)
    t0 = time.perf_counter()
    with eval_mode(model):
        with progress_bar() as progress:
            task = progress.add_task("smoothing certify", total=N, rate="")
            for i in range(N):
                c_a = int(sampler.counts(x[i], n0).argmax())
                k = int(sampler.counts(x[i], n)[c_a])
                pl = clopper_pearson_lower(k, n, alpha)
                count[i], p_lower[i] = k, pl
                if pl > 0.5:
                    prediction[i] = c_a
                    radius[i] = sigma * float(normal.ppf(pl))
                progress.update(task, advance=1, rate=rate_text(i + 1, time.perf_counter() - t0))
    correct = (prediction >= 0) & (prediction == y.detach().cpu().long())
    return SmoothingResult(
        sigma=sigma, n0=n0, n=n, alpha=alpha, seed=int(seed), prediction=prediction, radius=radius,
        correct=correct, p_lower=p_lower, count=count, seconds=time.perf_counter() - t0,
    )


def predict_smoothing(
    model: nn.Module,
    x: torch.Tensor,
    *,
    sigma: float,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    seed: int = 0,
) -> torch.Tensor:
    """PREDICT: the smoothed classifier's class per sample (``-1`` = abstain), ``(N,)`` int64.

    Counts the top two classes over ``n`` noisy copies and abstains unless a
    two-sided binomial test of ``n_A`` vs ``n_A + n_B`` at 1/2 has p-value
    ``<= alpha`` (then the returned class differs from ``g(x)`` with probability
    at most ``alpha``).
    """
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sigma, alpha, batch_size = _check_common(sigma, alpha, batch_size)
    n = check_int(n, "n", 1)
    x = _check_x(x)
    from scipy.stats import binomtest

    gen = _generator(x, seed)
    sampler = _Sampler(model, sigma, batch_size, gen)
    out = torch.full((x.shape[0],), -1, dtype=torch.long)
    with eval_mode(model):
        for i in range(x.shape[0]):
            counts = sampler.counts(x[i], n)
            top = torch.topk(counts, k=min(2, counts.numel()))
            n_a = int(top.values[0])
            n_b = int(top.values[1]) if counts.numel() > 1 else 0
            if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
                out[i] = int(top.indices[0])
    return out
