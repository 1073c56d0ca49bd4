"""Adapters for the peer libraries: torchattacks, ART (optional) and pyautoattack.

Each adapter takes a [0,1]-input model, images ``x`` in [0,1] and labels ``y``
and returns adversarial images as a torch tensor, so that the harness can
re-check every result with one forward pass of the same model.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("bench.peers")


def art_available() -> bool:
    """True when adversarial-robustness-toolbox (the ``bench`` extra) is importable."""
    try:
        import art  # noqa: F401
        from art.attacks.evasion import ProjectedGradientDescentPyTorch  # noqa: F401
    except Exception:  # ImportError, or a broken optional dependency of ART
        return False
    return True


def versions() -> dict[str, str]:
    """Versions of the peers (``"missing"`` when not importable)."""
    out: dict[str, str] = {}
    for mod in ("torchattacks", "art", "pyautoattack"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:
            out[mod] = "missing"
    return out


def torchattacks_pgd(model, x, y, *, eps: float, alpha: float, steps: int, random_start: bool, seed: int = 0) -> torch.Tensor:
    """torchattacks.PGD (Linf, CE); its random start draws from the global RNG, seeded here."""
    import torchattacks

    atk = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=random_start)
    torch.manual_seed(seed)
    return atk(x, y)


def torchattacks_pgd_curve(model, x, y, radii, *, steps: int, alpha_of, random_start: bool, seed: int = 0) -> list[torch.Tensor]:
    """torchattacks.PGD looped over the radii on all samples (how users compute a curve with it)."""
    out = []
    for eps in radii:
        out.append(torchattacks_pgd(model, x, y, eps=eps, alpha=alpha_of(eps), steps=steps,
                                    random_start=random_start, seed=seed))
    return out


class ArtPGD:
    """ART's ProjectedGradientDescentPyTorch on a PyTorchClassifier (numpy in, numpy out)."""

    def __init__(self, model, input_shape: tuple[int, ...], num_classes: int = 10) -> None:
        from art.estimators.classification import PyTorchClassifier

        logging.getLogger("art").setLevel(logging.WARNING)
        self.clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
                                     nb_classes=num_classes, clip_values=(0.0, 1.0), device_type="cpu")

    def __call__(self, x, y, *, eps: float, alpha: float, steps: int, random_start: bool, seed: int = 0) -> torch.Tensor:
        import numpy as np
        from art.attacks.evasion import ProjectedGradientDescentPyTorch

        atk = ProjectedGradientDescentPyTorch(self.clf, norm=np.inf, eps=eps, eps_step=alpha, max_iter=steps,
                                              targeted=False, num_random_init=int(random_start),
                                              batch_size=int(x.shape[0]), verbose=False)
        np.random.seed(seed)
        adv = atk.generate(x=x.numpy(), y=y.numpy())
        return torch.from_numpy(adv)


def pyautoattack_curve(model, x, y, radii, *, norm: str = "Linf", version: str = "standard", seed: int = 0,
                       batch_size: int = 500) -> list[torch.Tensor]:
    """pyautoattack.AutoAttack looped over the radii, each radius on all samples."""
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    out = []
    for eps in radii:
        aa = AutoAttack(model, eps=float(eps), norm=norm, version=version, seed=seed, device="cpu")
        aa.verbose = False
        x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
        out.append(x_adv)
    return out


def robust_mask(model, x_adv: torch.Tensor, y: torch.Tensor, x: torch.Tensor | None = None,
                eps: float | None = None) -> torch.Tensor:
    """Per-sample ``pred(x_adv) == y`` (one forward pass); checks the Linf radius when ``x``/``eps`` are given."""
    if x is not None and eps is not None:
        lin = (x_adv - x).flatten(1).abs().amax(1)
        if bool((lin > eps + 1e-6).any()):
            raise RuntimeError(f"perturbation exceeds eps={eps}: max {float(lin.max())}")
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def describe(obj: Any) -> str:
    return type(obj).__name__
