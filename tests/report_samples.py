"""A ``samples.safetensors`` consistent with a hand-made results dict (report_fixtures), and the dict's
``per_class`` counts derived from it, for the report's per-class and lost-sample sections.

Layout (audit order): the teacher is robust at radius i on samples [0, T_i), the student on
[L_i, L_i + S_i), so the lost samples at radius i are exactly [0, L_i) (T_i, S_i: worst-case counts,
L_i: ``transfer[i].lost.k``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np


def sample_arrays(d: dict[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Per-sample arrays matching the counts of ``d`` (N samples, 1x28x28 images)."""
    rng = np.random.default_rng(seed)
    n = d["teacher"]["clean"]["n"]
    radii = d["radii"]
    r = len(radii)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    t_rob = np.zeros((r, n), bool)
    s_rob = np.zeros((r, n), bool)
    for i in range(r):
        t, s = d["teacher"]["per_radius"][i]["worst"]["k"], d["student"]["per_radius"][i]["worst"]["k"]
        lost = d["transfer"][i]["lost"]["k"]
        assert lost <= t <= lost + s, "the layout needs lost <= teacher robust <= lost + student robust"
        t_rob[i, :t] = True
        s_rob[i, lost:lost + s] = True
    t_clean = np.zeros(n, bool)
    t_clean[: d["teacher"]["clean"]["k"]] = True
    s_clean = s_rob.any(axis=0) | (np.arange(n) < d["student"]["clean"]["k"])
    x = rng.random((n, 1, 28, 28), dtype=np.float32)
    eps = float(radii[-1])
    delta = np.where(rng.random(x.shape) < 0.5, -eps, eps).astype(np.float32)
    x_s = np.clip(x + np.where(s_rob[-1], 0.0, 1.0)[:, None, None, None].astype(np.float32) * delta, 0, 1)
    first_broken = np.array([next((radii[i] for i in range(r) if not s_rob[i, j]), np.nan) for j in range(n)])
    s_radius = np.where(s_clean, first_broken, np.nan)
    t_radius = np.array([next((radii[i] for i in range(r) if not t_rob[i, j]), np.nan) for j in range(n)])
    t_radius = np.where(t_clean, t_radius, np.nan)
    return {
        "indices": np.arange(1000, 1000 + n, dtype=np.int64), "labels": labels, "radii": np.asarray(radii, np.float64),
        "teacher.clean_correct": t_clean, "teacher.robust": t_rob, "teacher.x_adv": x, "teacher.adv_radius": t_radius,
        "teacher.clean_pred": np.where(t_clean, labels, (labels + 1) % 10),
        "student.clean_correct": s_clean, "student.robust": s_rob, "student.x_adv": x_s, "student.adv_radius": s_radius,
        "student.clean_pred": np.where(s_clean, labels, (labels + 2) % 10),
        "student.adv_pred": np.where(s_rob[-1], labels, (labels + 3) % 10),
        "transfer.lost": t_rob & ~s_rob,
    }


def per_class_counts(labels: np.ndarray, clean: np.ndarray, robust: np.ndarray) -> dict[str, Any]:
    """The ``per_class`` record, counted with numpy (independently of robkd.auditing.aggregate)."""
    classes = np.unique(labels)
    return {"classes": [int(c) for c in classes],
            "n": [int((labels == c).sum()) for c in classes],
            "clean_correct": [int((clean & (labels == c)).sum()) for c in classes],
            "robust": [[int((row & (labels == c)).sum()) for c in classes] for row in robust]}


def with_samples(d: dict[str, Any], out: Path, seed: int = 0) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``d`` plus ``per_class`` blocks, and ``out/samples.safetensors`` written to match it."""
    from safetensors.numpy import save_file

    arrays = sample_arrays(d, seed)
    d = copy.deepcopy(d)
    for role in ("teacher", "student"):
        d[role]["per_class"] = per_class_counts(arrays["labels"], arrays[f"{role}.clean_correct"], arrays[f"{role}.robust"])
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out / "samples.safetensors"))
    return d, arrays
