"""``AuditResult.to_pandas()``: the per-sample tensors of samples.safetensors as one DataFrame row per sample."""

from __future__ import annotations

from pathlib import Path

import pytest
import report_fixtures as F
import torch

from robkd.auditing import AuditResult
from robkd.report import ResultsError

RADII_TEXT = ["0.02", "0.05", "0.1"]  # format_radius of F.RADII, written out independently


def _tensors(n: int = 11, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random per-sample tensors in the layout of docs/results-schema.md (3 radii, fgsm then pgd-20)."""
    g = torch.Generator().manual_seed(seed)
    r = len(F.RADII)
    t: dict[str, torch.Tensor] = {
        "indices": torch.randperm(1000, generator=g)[:n],
        "labels": torch.randint(0, 10, (n,), generator=g),
        "radii": torch.tensor(F.RADII, dtype=torch.float64),
        "transfer.lost": torch.rand(r, n, generator=g) < 0.3,
        "transfer.gained": torch.rand(r, n, generator=g) < 0.3,
        "prop2.bound": torch.rand(r, n, generator=g, dtype=torch.float64),
    }
    for m in ("teacher", "student"):
        t[f"{m}.clean_pred"] = torch.randint(0, 10, (n,), generator=g)
        t[f"{m}.clean_correct"] = t[f"{m}.clean_pred"] == t["labels"]
        t[f"{m}.broken_by"] = torch.randint(-2, 2, (r, n), generator=g)
        t[f"{m}.robust"] = t[f"{m}.broken_by"] == -1
        t[f"{m}.robust_after.fgsm"] = torch.rand(r, n, generator=g) < 0.5
        t[f"{m}.robust_after.pgd-20"] = t[f"{m}.robust"].clone()
        t[f"{m}.x_adv"] = torch.rand(n, 1, 4, 4, generator=g)
        t[f"{m}.adv_radius"] = torch.where(torch.rand(n, generator=g) < 0.5, torch.tensor(0.05, dtype=torch.float64),
                                           torch.tensor(float("nan"), dtype=torch.float64))
    return t


def test_to_pandas_matches_the_tensors_cell_by_cell(tmp_path: Path) -> None:
    tensors = _tensors()
    AuditResult(F.audit_result(), tensors).write(tmp_path)
    df = AuditResult.load(tmp_path).to_pandas()  # through samples.safetensors
    n = len(tensors["indices"])
    assert len(df) == n and df.index.name == "index"
    assert df.index.tolist() == tensors["indices"].tolist()  # audit order, indexed by dataset position
    expected = {"label"}
    for name, t in tensors.items():
        if name in ("indices", "labels", "radii") or t.dim() > 2:
            continue
        expected |= {name} if t.dim() == 1 else {f"{name}@{text}" for text in RADII_TEXT}
    assert set(df.columns) == expected
    assert df.columns[0] == "label" and not any("x_adv" in c for c in df.columns)
    for p in range(n):
        row = df.loc[int(tensors["indices"][p])]
        assert row["label"] == int(tensors["labels"][p])
        for m in ("teacher", "student"):
            assert row[f"{m}.clean_pred"] == int(tensors[f"{m}.clean_pred"][p])
            assert bool(row[f"{m}.clean_correct"]) == bool(tensors[f"{m}.clean_correct"][p])
            adv = float(tensors[f"{m}.adv_radius"][p])
            assert (row[f"{m}.adv_radius"] == adv) or (adv != adv and row[f"{m}.adv_radius"] != row[f"{m}.adv_radius"])
            for j, text in enumerate(RADII_TEXT):
                assert row[f"{m}.broken_by@{text}"] == int(tensors[f"{m}.broken_by"][j, p])
                assert bool(row[f"{m}.robust@{text}"]) == bool(tensors[f"{m}.robust"][j, p])
                for a in ("fgsm", "pgd-20"):
                    assert bool(row[f"{m}.robust_after.{a}@{text}"]) == bool(tensors[f"{m}.robust_after.{a}"][j, p])
        for j, text in enumerate(RADII_TEXT):
            assert bool(row[f"transfer.lost@{text}"]) == bool(tensors["transfer.lost"][j, p])
            assert row[f"prop2.bound@{text}"] == float(tensors["prop2.bound"][j, p])
    # dtypes are kept; per-radius counts agree with the tensors
    assert df["student.robust@0.1"].dtype == bool and df["teacher.broken_by@0.02"].dtype == "int64"
    assert int(df["student.robust@0.05"].sum()) == int(tensors["student.robust"][1].sum())
    # columns come by model, then transfer, then prop2
    groups = [c.split(".", 1)[0] for c in df.columns[1:]]
    assert groups == sorted(groups, key=["teacher", "student", "transfer", "prop2"].index)


def test_to_pandas_without_tensors_is_a_clear_error(tmp_path: Path) -> None:
    AuditResult(F.audit_result(), _tensors()).write(tmp_path)
    with pytest.raises(ResultsError, match="per-sample tensors"):
        AuditResult.load(tmp_path, tensors=False).to_pandas()


def test_write_refuses_a_result_that_breaks_the_schema(tmp_path: Path) -> None:
    d = F.audit_result()
    d["student"]["clean"]["value"] = 1.5
    with pytest.raises(ResultsError, match="student.clean.value"):
        AuditResult(d, _tensors()).write(tmp_path / "out")
    assert not (tmp_path / "out").exists()
