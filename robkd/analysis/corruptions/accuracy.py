"""Accuracy under the common corruptions: per corruption and severity, and the mean corruption accuracy."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from torch import nn

from robkd.analysis.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    check_name,
    check_severity,
    corrupt,
    frost_source,
    resolve_profile,
)
from robkd.errors import UsageError
from robkd.utils.modules import eval_mode, model_device
from robkd.utils.validate import check_int

__all__ = ["CorruptionResult", "corruption_accuracy"]


@dataclasses.dataclass
class CorruptionResult:
    """Correct counts under each (corruption, severity) on ``n`` samples, and the clean count.

    ``correct[name][severity]``: samples still classified correctly. ``mean_accuracy`` (mCA) is the
    mean of the accuracies over every corruption and severity evaluated; ``per_sample`` (optional)
    holds the per-sample correctness ``{name: {severity: (n,) bool}}``.
    """

    n: int
    clean_correct: int
    correct: dict[str, dict[int, int]]
    settings: dict[str, Any]
    per_sample: "dict[str, dict[int, torch.Tensor]] | None" = None

    def accuracy(self, name: str, severity: int) -> float:
        return self.correct[name][severity] / self.n

    @property
    def clean_accuracy(self) -> float:
        return self.clean_correct / self.n

    @property
    def mean_accuracy(self) -> float:
        """Mean corruption accuracy over every (corruption, severity) evaluated."""
        accs = [c / self.n for per in self.correct.values() for c in per.values()]
        return sum(accs) / len(accs)

    def severity_accuracy(self, severity: int) -> float:
        """Mean accuracy over the corruptions at one severity (e.g. the ``corruption@3`` gate figure)."""
        accs = [per[severity] / self.n for per in self.correct.values() if severity in per]
        if not accs:
            raise UsageError(f"severity {severity} was not evaluated")
        return sum(accs) / len(accs)

    def corruption_mean(self, name: str) -> float:
        """Mean accuracy of one corruption over its severities."""
        per = self.correct[name]
        return sum(per.values()) / (len(per) * self.n)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: settings, counts and accuracies per corruption and severity, the means."""
        sev = sorted({s for per in self.correct.values() for s in per})
        return {
            "n": self.n,
            "clean_correct": self.clean_correct,
            "clean_accuracy": self.clean_accuracy,
            "mean_accuracy": self.mean_accuracy,
            "severity_accuracy": {str(s): self.severity_accuracy(s) for s in sev},
            "corruptions": {
                name: {
                    "correct": {str(s): c for s, c in per.items()},
                    "accuracy": {str(s): c / self.n for s, c in per.items()},
                    "mean": self.corruption_mean(name),
                }
                for name, per in self.correct.items()
            },
            "settings": dict(self.settings),
        }


def corruption_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    corruptions: "Sequence[str] | None" = None,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 256,
    seed: int = 0,
    *,
    params: str = "auto",
    ids: "torch.Tensor | Sequence[int] | None" = None,
    keep_per_sample: bool = False,
) -> CorruptionResult:
    """Accuracy of ``model`` on ``(x, y)`` under each corruption (default: all 15) at each severity.

    Corrupted batches are generated on the fly (:func:`robkd.analysis.corruptions.corrupt`) with
    per-sample seeds from ``(seed, id)``; ``ids`` default to the positions in ``x``, so counts do not
    depend on ``batch_size``. The model runs in eval mode without gradients."""
    from robkd.analysis.llm import check_inputs, check_model

    model = check_model(model)
    x, y = check_inputs(x, y)
    if x.dim() != 4:
        raise UsageError("x must be an image batch (N, C, H, W)")
    names = list(CORRUPTIONS) if corruptions is None else [check_name(c) for c in corruptions]
    if not names:
        raise UsageError("corruptions must name at least one corruption")
    if isinstance(severities, int):
        severities = [severities]
    sevs = [check_severity(s) for s in severities]
    if not sevs:
        raise UsageError("severities must not be empty")
    batch_size = check_int(batch_size, "batch_size", 1)
    n = x.shape[0]
    id_t = torch.arange(n) if ids is None else torch.as_tensor(ids).flatten()
    if id_t.shape != (n,):
        raise UsageError(f"ids must give one id per sample ({n})")
    profile = resolve_profile(x.shape[-2], x.shape[-1], params)
    device = model_device(model)
    hits = {name: {s: torch.zeros(n, dtype=torch.bool) for s in sevs} for name in names}
    clean = torch.zeros(n, dtype=torch.bool)
    with eval_mode(model), torch.no_grad():
        for s0 in range(0, n, batch_size):
            sl = slice(s0, min(s0 + batch_size, n))
            xb, yb = x[sl], y[sl].to(device)
            clean[sl] = (model(xb.to(device)).argmax(dim=1) == yb).cpu()
            for name in names:
                for sev in sevs:
                    xc = corrupt(xb, name, sev, seed=seed, ids=id_t[sl], params=params)
                    hits[name][sev][sl] = (model(xc.to(device)).argmax(dim=1) == yb).cpu()
    settings = {
        "seed": seed,
        "params": profile.name,
        "scale": profile.scale,
        "severities": sevs,
        "corruptions": names,
        "frost_source": frost_source() if "frost" in names else None,
    }
    return CorruptionResult(
        n=n,
        clean_correct=int(clean.sum()),
        correct={name: {s: int(h.sum()) for s, h in per.items()} for name, per in hits.items()},
        settings=settings,
        per_sample=hits if keep_per_sample else None,
    )
