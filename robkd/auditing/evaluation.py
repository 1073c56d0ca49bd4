"""``robkd.evaluate``: one model's clean and robust accuracy (RobustBench style), with confidence intervals.

The same machinery as the audit, for one model: :func:`~robkd.auditing.plan.make_model_plan` (the model and
data checks), :func:`~robkd.auditing.stages.run_model` (clean predictions and the attack
:class:`~robkd.attacks.Suite`), :func:`~robkd.auditing.aggregate.model_block` (the figures and their
Clopper-Pearson intervals) and the sanity checks; the figures are those an audit reports for its teacher.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from robkd.auditing import aggregate, stages
from robkd.auditing.config import AuditConfig
from robkd.auditing.plan import make_model_plan
from robkd.errors import UsageError
from robkd.types import Norm, format_radius

if TYPE_CHECKING:
    import pandas as pd

ROLE = "model"
#: the :class:`AuditConfig` settings :func:`evaluate` takes as keywords besides its named arguments
SETTINGS = ("split", "data_dir", "download", "img_size", "arch", "mean", "std", "num_classes", "input_shape",
            "allow_pickle", "sanity_n")


@dataclasses.dataclass(frozen=True)
class Accuracy:
    """``k`` of ``n`` samples (``value = k / n``) with its two-sided Clopper-Pearson interval."""

    value: float
    k: int
    n: int
    ci_low: float
    ci_high: float
    confidence: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Accuracy":
        return cls(float(d["value"]), int(d["k"]), int(d["n"]), float(d["ci_low"]), float(d["ci_high"]),
                   float(d["confidence"]))

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        return f"{100 * self.value:.1f}% [{100 * self.ci_low:.1f}, {100 * self.ci_high:.1f}]"


@dataclasses.dataclass(frozen=True)
class RadiusAccuracy:
    """Robust accuracy at one radius: the worst case over the attacks, and after each attack of the cascade
    (cumulative, in cascade order); ``broken_by``: samples each attack broke first."""

    radius: float
    radius_text: str
    robust: Accuracy
    after_attack: Mapping[str, Accuracy]
    broken_by: Mapping[str, int]


class EvaluationResult:
    """What :func:`evaluate` returns: ``clean`` and ``per_radius`` :class:`Accuracy` figures, the sanity flags,
    the model and data records, and the per-sample tensors (``to_pandas()``)."""

    def __init__(self, data: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        self._data = data
        self.tensors = dict(tensors)
        self.clean = Accuracy.from_dict(data["clean"])
        self.per_radius = [
            RadiusAccuracy(float(r["radius"]), str(r["radius_text"]), Accuracy.from_dict(r["worst"]),
                           {a: Accuracy.from_dict(v) for a, v in r["after_attack"].items()}, dict(r["broken_by"]))
            for r in data["per_radius"]]

    @property
    def norm(self) -> Norm:
        return Norm.parse(self._data["norm"])

    @property
    def radii(self) -> list[float]:
        return [r.radius for r in self.per_radius]

    @property
    def attacks(self) -> list[str]:
        return list(self._data["attacks"])

    @property
    def n(self) -> int:
        return self.clean.n

    @property
    def clean_accuracy(self) -> float:
        """Clean accuracy (a fraction)."""
        return self.clean.value

    @property
    def robust_accuracy(self) -> float:
        """Worst-case robust accuracy at the largest radius (a fraction), RobustBench's headline figure."""
        return self.per_radius[-1].robust.value

    def at(self, eps: float | str) -> RadiusAccuracy:
        """The figures at radius ``eps`` (a number or text such as ``"8/255"``)."""
        from robkd.types import parse_radius

        r = parse_radius(eps) if isinstance(eps, str) else float(eps)
        for row in self.per_radius:
            if abs(row.radius - r) <= 1e-9 * max(1.0, r):
                return row
        raise UsageError(f"radius {format_radius(r)} was not evaluated (radii: "
                         f"{', '.join(x.radius_text for x in self.per_radius)})")

    @property
    def sanity_flags(self) -> list[dict[str, Any]]:
        """Sanity flags raised on the evaluation (signs of gradient masking and the like)."""
        return [dict(f) for f in self._data["sanity"]["flags"]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable record (a deep copy)."""
        return json.loads(json.dumps(self._data, allow_nan=False))

    def to_pandas(self) -> "pd.DataFrame":
        """The per-sample outcomes, one row per sample in evaluation order, as :meth:`AuditResult.to_pandas`
        gives them for each model, without the role prefix: index ``index`` (the sample's position in the
        dataset or in-memory source), ``label``, ``clean_pred``, ``clean_correct``, ``adv_radius``, and per
        radius ``robust@R``, ``broken_by@R`` (index into ``attacks``; -1 robust, -2 misclassified clean),
        ``robust_after.<attack>@R``; images are left out."""
        import pandas as pd

        index = self.tensors["indices"].cpu().numpy()
        n = len(index)
        labels = [r.radius_text for r in self.per_radius]
        columns: dict[str, Any] = {"label": self.tensors["labels"].cpu().numpy()}
        prefix = f"{ROLE}."
        for name in sorted(k for k in self.tensors if k.startswith(prefix)):
            values = self.tensors[name].cpu().numpy()
            short = name[len(prefix):]
            if values.shape == (n,):
                columns[short] = values
            elif values.shape == (len(labels), n):
                columns.update({f"{short}@{label}": values[j] for j, label in enumerate(labels)})
        return pd.DataFrame(columns, index=pd.Index(index, name="index"))

    def __repr__(self) -> str:
        rob = ", ".join(f"{r.radius_text}: {r.robust}" for r in self.per_radius)
        return f"EvaluationResult(n={self.n}, {self.norm.value}, clean {self.clean}, robust {rob})"


def evaluate(
    model: "str | Path | nn.Module",
    data: Any = None,
    *,
    threat_model: Any = "Linf",
    eps: "Sequence[float] | str | float | None" = None,
    attacks: "Sequence[str] | str | None" = None,
    n: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    seed: int | None = None,
    sanity: bool = True,
    on_event: Any = None,
    **kw: Any,
) -> EvaluationResult:
    """Clean and robust accuracy of one model, with 95% Clopper-Pearson intervals.

    ``model``: a model file or a module (a plain module takes [0,1] inputs unless ``mean``/``std`` are given).
    ``data``: a dataset name or file (default fashion-mnist), or in-memory data, as for :func:`robkd.audit`:
    ``(x, y)`` tensors, a ``Dataset`` or a ``DataLoader``. ``threat_model``: ``"Linf"``/``"L2"``, a
    :class:`~robkd.types.Norm` or RobustBench's ``ThreatModel`` enum. ``eps``: one radius or several (needed
    for in-memory data; default the dataset's usual radius). ``attacks``: the suite (default ``pgd-20``;
    ``"autoattack"`` for RobustBench's standard evaluation). ``n``, ``seed``: the seeded subset (the audit's
    rule). ``sanity``: also run the sanity checks. Further keywords: ``split``, ``data_dir``, ``download``,
    ``img_size``, ``arch``, ``mean``, ``std``, ``num_classes``, ``input_shape``, ``allow_pickle``, ``sanity_n``.
    """
    from robkd.analysis.sanity import run_sanity_checks
    from robkd.auditing.api import plain_setting
    from robkd.data import IN_MEMORY, is_in_memory

    t_start = time.perf_counter()
    unknown = sorted(set(kw) - set(SETTINGS))
    if unknown:
        raise UsageError(f"evaluate() got unknown keyword(s) {', '.join(unknown)} (known: {', '.join(SETTINGS)})")
    if not isinstance(sanity, bool):
        raise UsageError(f"sanity must be true or false, got {type(sanity).__name__}")
    memory = data if is_in_memory(data) else None
    norm = _norm(threat_model)
    values: dict[str, Any] = {k: plain_setting(k, v) for k, v in dict(
        data=IN_MEMORY if memory is not None else data, n=n, seed=seed, eps=eps, norm=norm.value,
        attacks=[attacks] if isinstance(attacks, str) else (list(attacks) if attacks is not None else None),
        batch_size=batch_size, device=device, **kw).items()}
    path = None
    if isinstance(model, (str, Path)):
        path = str(model)
        values["teacher"] = path
    cfg = AuditConfig.from_spec(None, **values)
    plan = make_model_plan(cfg, None if path is not None else model, None, data=memory, role=ROLE)
    event = on_event or (lambda kind, info: None)
    outcome = stages.run_model(plan, ROLE, plan.x, plan.y, torch.arange(plan.n), None, event)
    nf = stages.count_non_finite(plan, outcome)
    block, tensors = aggregate.model_block(plan, outcome, nf.adv_pred)
    tensors.update(indices=plan.indices.clone(), labels=plan.y.cpu().clone(),
                   radii=torch.tensor(plan.radii, dtype=torch.float64))
    block["non_finite"] = nf.to_dict()
    flags: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if sanity:
        c = plan.cfg
        for f in run_sanity_checks(plan.models[ROLE], plan.x, plan.y, result=outcome.suite, radii=list(plan.radii),
                                   norm=plan.norm, name=ROLE, seed=c.seed, extra=c.sanity_n > 0, n=c.sanity_n or 64,
                                   attacks=c.attacks):
            flags.append({**f.to_dict(), "model": f.model or ROLE})
    if nf.clean or nf.adversarial:
        flags.append({"code": "non-finite-outputs", "model": ROLE,
                      "message": f"{nf.clean} clean and {nf.adversarial} adversarial input(s) gave NaN or infinite logits",
                      "suggestion": "they count as misclassified and not robust; check the model's numerics"})
    block.update({
        "kind": "robkd-evaluation",
        "norm": plan.norm.value,
        "radii": list(plan.radii),
        "radii_text": [format_radius(r) for r in plan.radii],
        "attacks": list(plan.cfg.attacks),
        "cascade_order": list(plan.suite.order),
        "data": dict(plan.data_info),
        "config": plan.cfg.to_dict(),
        "sanity": {"checked": sanity, "flags": flags},
        "timings": {**outcome.timings.to_dict(), "sanity_s": time.perf_counter() - t0, "total_s": time.perf_counter() - t_start},
    })
    return EvaluationResult(block, tensors)


def _norm(threat_model: Any) -> Norm:
    """``Linf``/``L2`` from a string, a :class:`Norm` or an enum whose value is one (RobustBench's ThreatModel)."""
    value = getattr(threat_model, "value", threat_model)
    if not isinstance(value, (str, Norm)):
        raise UsageError(f"threat_model must be 'Linf' or 'L2', got {type(threat_model).__name__}")
    try:
        return Norm.parse(value)
    except UsageError:
        raise UsageError(f"threat_model {str(value)[:40]!r} is not one robkd evaluates: use 'Linf' or 'L2'") from None
