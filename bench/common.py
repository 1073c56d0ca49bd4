"""Shared harness pieces: interleaved timing, result rows, benchmark models and inputs."""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import time
from typing import Any, Callable

import torch

log = logging.getLogger("bench")


@dataclasses.dataclass
class Config:
    """Run-wide settings shared by every benchmark family."""

    quick: bool = False
    threads: int = 2
    repeats: int = 5
    warmup: int = 1
    seed: int = 0


@dataclasses.dataclass
class Row:
    """One benchmark figure: a ratio (``num / den`` medians), its target and its equality check.

    ``ratio`` is ``median(num) / median(den)``; ``target`` is a human-readable
    bound (e.g. ``"<= 1.05"``) and ``met`` whether the ratio satisfies it
    (None when there is no target). ``check`` says what was compared for
    equality and ``check_ok`` whether the results were equal.
    """

    family: str
    case: str
    figure: str
    ratio: float | None
    target: str | None = None
    met: bool | None = None
    check: str = ""
    check_ok: bool | None = None
    note: str = ""
    timings: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    unit: str = "x"
    cpu_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def judge(ratio: float | None, target: str | None) -> bool | None:
    """Evaluate ``ratio`` against a target string ``"<= v"`` or ``">= v"``."""
    if ratio is None or target is None:
        return None
    op, _, val = target.partition(" ")
    v = float(val)
    if op == "<=":
        return ratio <= v
    if op == ">=":
        return ratio >= v
    raise ValueError(f"bad target {target!r}")


def make_row(family: str, case: str, figure: str, times: dict[str, list[float]], num: str, den: str,
             target: str | None = None, check: str = "", check_ok: bool | None = None, note: str = "",
             invert: bool = False) -> Row:
    """A :class:`Row` with ``ratio = median(times[num]) / median(times[den])`` (or its inverse)."""
    r = median(times[num]) / median(times[den])
    rc = None
    if f"{num}#cpu" in times and f"{den}#cpu" in times:
        rc = median(times[f"{num}#cpu"]) / max(median(times[f"{den}#cpu"]), 1e-12)
    if invert:
        r, rc = 1.0 / r, (None if rc is None else 1.0 / rc)
    keep = [k for k in (num, den, f"{num}#cpu", f"{den}#cpu") if k in times]
    return Row(family, case, figure, r, target, judge(r, target), check, check_ok, note,
               {k: times[k] for k in keep}, cpu_ratio=rc)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def time_interleaved(cases: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, interleaved round-robin (rotating order) after ``warmup`` rounds.

    Interleaving spreads machine drift (other processes, thermal state) evenly
    over the contenders; rotating the start cancels order effects. Returns the
    wall-clock seconds of every repeat per case, and under ``"<case>#cpu"`` the
    process CPU seconds (``time.process_time``), which other processes on a busy
    machine disturb much less when torch runs one thread.
    """
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            cases[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    out.update({f"{n}#cpu": [] for n in names})
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            cases[n]()
            out[n].append(time.perf_counter() - t0)
            out[f"{n}#cpu"].append(time.process_time() - c0)
    return out


def time_once(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall-clock seconds, process CPU seconds of one call, and its result."""
    c0, t0 = time.process_time(), time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, time.process_time() - c0, res


# ----------------------------------------------------------------------------- models and inputs

FMNIST_MEAN, FMNIST_STD = (0.286,), (0.353,)


def _fresh(arch: str, input_shape: tuple[int, int, int], seed: int, mean=None, std=None):
    from robkd.models import build_model

    torch.manual_seed(seed)
    return build_model(arch, input_shape=input_shape, num_classes=10, mean=mean, std=std).eval()


@functools.lru_cache(maxsize=None)
def small_cnn(kind: str = "trained", seed: int = 0):
    """``robkd:cnn_small`` on 1x28x28: ``"random"`` init, ``"trained"`` (3 epochs SGD on the bundled
    Fashion-MNIST slice, ~80% clean) or ``"robust"`` (trained, then 2 epochs FGSM-RS adversarial
    training at eps 0.1: a cheap, somewhat robust model whose points survive small radii)."""
    m = _fresh("robkd:cnn_small", (1, 28, 28), seed, FMNIST_MEAN, FMNIST_STD)
    if kind == "random":
        return m
    if kind not in ("trained", "robust"):
        raise ValueError(kind)
    _train(m, epochs=3, seed=seed, adv_eps=0.0)
    if kind == "robust":
        _train(m, epochs=2, seed=seed + 1, adv_eps=0.1, lr=0.02)
    for p in m.parameters():
        p.grad = None
    return m.eval()


def _train(model, *, epochs: int, seed: int, adv_eps: float, lr: float = 0.05) -> None:
    import torch.nn.functional as F

    from robkd.data import load_dataset

    data = load_dataset("fashion-mnist-slice", "train")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for s in range(0, len(data), 64):
            idx = perm[s:s + 64]
            x, y = data.float_x(idx), data.y[idx]
            if adv_eps > 0:  # FGSM with random start (Wong et al. 2020)
                d = (torch.rand(x.shape, generator=g) * 2 - 1) * adv_eps
                xa = (x + d).clamp(0, 1).requires_grad_(True)
                (gx,) = torch.autograd.grad(F.cross_entropy(model(xa), y), xa)
                x = (x + (xa.detach() - x + 1.25 * adv_eps * gx.sign()).clamp(-adv_eps, adv_eps)).clamp(0, 1)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


@functools.lru_cache(maxsize=None)
def resnet18(seed: int = 0):
    """CIFAR-style ``robkd:resnet18`` with random weights on 3x32x32 (eval mode, BN running stats 0/1)."""
    return _fresh("robkd:resnet18", (3, 32, 32), seed, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))


def fmnist_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` real Fashion-MNIST test images (seeded subset of the bundled slice) in [0,1] and labels."""
    from robkd.data import eval_subset, load_dataset

    d = eval_subset(load_dataset("fashion-mnist-slice", "test"), n, seed)
    return d.float_x(), d.y.clone()


def synthetic_inputs(model, n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random images in [0,1]; labels are the model's own predictions (all clean-correct)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n,) + tuple(shape), generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def predictions(model, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def param_grad_guard(model):
    """Context manager recording whether autograd computed any parameter gradient inside it.

    Registers a tensor hook on every parameter that requires grad; the hook
    fires exactly when autograd computes that parameter's gradient. Yields a
    list that receives the names of the parameters whose gradients were computed.
    """
    import contextlib

    @contextlib.contextmanager
    def _guard():
        hits: list[str] = []
        handles = []
        for name, p in model.named_parameters():
            if p.requires_grad:
                handles.append(p.register_hook(lambda g, n=name: hits.append(n)))
        try:
            yield hits
        finally:
            for h in handles:
                h.remove()

    return _guard()
