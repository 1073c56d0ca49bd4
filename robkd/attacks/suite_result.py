"""The per-sample outcome of a :class:`~robkd.attacks.Suite` run (:class:`SuiteResult`), its resume form, and
where its kept adversarial examples live (in memory, or spilled to a file: :mod:`robkd.utils.spill`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from robkd.errors import UsageError
from robkd.types import Norm, format_radius
from robkd.utils.spill import is_spilled, put_rows, release, spill_copy, spill_empty, spill_open, spill_supported, take_rows

#: broken_by code of a sample that is robust at that radius
ROBUST = -1
#: broken_by code of a sample misclassified without any perturbation
CLEAN_WRONG = -2


def data_fingerprint(x: torch.Tensor, y: torch.Tensor, chunk: int = 256) -> list[float]:
    """A cheap content fingerprint of the evaluation set (detects resuming on other data).

    Accumulated in float64 over row chunks, so it never holds a float64 copy of the whole set.
    """
    n = x.shape[0]
    d = x[0].numel() if n else 0
    w = torch.arange(1, d + 1, dtype=torch.float64, device=x.device) / max(d, 1)
    ws = torch.arange(1, n + 1, dtype=torch.float64, device=x.device) / max(n, 1)
    total = weighted = rows = 0.0
    for s in range(0, n, chunk):
        xd = x[s : s + chunk].detach().flatten(1).double()
        row_sums = xd.sum(1)
        total += float(row_sums.sum())
        weighted += float((xd @ w).sum())
        rows += float((row_sums * ws[s : s + chunk]).sum())
    yd = y.detach().double()
    return [float(n), total, weighted, rows, float(yd.sum()), float((yd * ws.to(yd.device)).sum())]


@dataclasses.dataclass
class SuiteResult:
    """Per-sample outcome of a :class:`Suite` run.

    ``broken_by[r, i]`` is the index into ``attacks`` of the first attack in
    execution order that broke sample ``i`` at ``radii[r]`` (or at a smaller radius,
    whose perturbation is valid at ``radii[r]`` too),
    ``-1`` when robust, ``-2`` when misclassified clean. ``x_adv[i]`` is the
    verified adversarial example found at the smallest radius ``adv_radius[i]``
    (``x`` itself and NaN for samples never broken; a tensor spilled to a file
    (:mod:`robkd.utils.spill`) when the suite ran with ``spill``: read it by rows with
    :meth:`adv_rows`). ``order`` is the execution
    order; ``rejected`` counts claimed examples that failed the re-check, per
    ``"attack@radius"``; ``seconds`` is the attack time per attack.
    """

    attacks: list[str]
    order: list[str]
    radii: list[float]
    norm: Norm
    clean_correct: torch.Tensor
    broken_by: torch.Tensor
    x_adv: torch.Tensor
    adv_radius: torch.Tensor
    done: set[tuple[str, float]] = dataclasses.field(default_factory=set)
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    fingerprint: list[float] = dataclasses.field(default_factory=list)

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.clean_correct.shape[0])

    @property
    def robust(self) -> torch.Tensor:
        """``(R, N)`` bool: robust against every attack of the suite (worst case)."""
        return self.broken_by == ROBUST

    @property
    def robust_after(self) -> dict[str, torch.Tensor]:
        """``attack -> (R, N)`` bool: worst case over the attacks run up to and including it (execution order)."""
        out: dict[str, torch.Tensor] = {}
        seen: list[int] = []
        for name in self.order:
            seen.append(self.attacks.index(name))
            broken = torch.zeros_like(self.broken_by, dtype=torch.bool)
            for k in seen:
                broken |= self.broken_by == k
            out[name] = self.clean_correct.unsqueeze(0) & ~broken
        return out

    @property
    def complete(self) -> bool:
        """Whether every (attack, radius) pair has run."""
        return all((a, r) in self.done for a in self.attacks for r in self.radii)

    def clean_accuracy(self) -> float:
        """Fraction of samples classified correctly without perturbation."""
        return float(self.clean_correct.float().mean()) if self.n else float("nan")

    def robust_accuracy(self) -> list[float]:
        """Worst-case robust accuracy per radius (ascending radii)."""
        return [float(v) for v in self.robust.float().mean(1)] if self.n else [float("nan")] * len(self.radii)

    def robust_accuracy_after(self, attack: str) -> list[float]:
        """Robust accuracy per radius after ``attack`` in the cascade."""
        if attack not in self.attacks:
            raise UsageError(f"attack {attack!r} is not in this suite ({self.attacks})")
        return [float(v) for v in self.robust_after[attack].float().mean(1)]

    def broken_count(self, attack: str) -> list[int]:
        """Samples attributed to ``attack`` per radius (first breaker, inherited breaks included)."""
        k = self.attacks.index(attack)
        return [int(v) for v in (self.broken_by == k).sum(1)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no per-sample tensors)."""
        return {
            "attacks": list(self.attacks),
            "order": list(self.order),
            "norm": self.norm.value,
            "radii": list(self.radii),
            "radii_text": [format_radius(r) for r in self.radii],
            "n": self.n,
            "clean_accuracy": self.clean_accuracy(),
            "robust_accuracy": self.robust_accuracy(),
            "robust_accuracy_after": {a: self.robust_accuracy_after(a) for a in self.order},
            "broken_by_attack": {a: self.broken_count(a) for a in self.attacks},
            "rejected": dict(self.rejected),
            "seconds": dict(self.seconds),
            "complete": self.complete,
        }

    def adv_rows(self, index: torch.Tensor) -> torch.Tensor:
        """``x_adv[index]`` in memory (a spilled ``x_adv`` gives its pages back afterwards)."""
        return take_rows(self.x_adv, index)

    def adv_file(self) -> Path | None:
        """The named file ``x_adv`` is spilled to (None: in memory, or an anonymous spill)."""
        if not is_spilled(self.x_adv):
            return None
        p = Path(self.x_adv.untyped_storage().filename)
        return p if p.is_file() else None

    def to_tensors(self, *, external_adv: bool = False) -> dict[str, torch.Tensor]:
        """Everything as a flat ``str -> Tensor`` dict (safetensors / ``torch.save``-able) for resume.

        ``external_adv``: when ``x_adv`` is spilled to a named file, leave it there (the dict names the
        file, :meth:`from_tensors` maps it again from ``adv_dir``) instead of copying it into the dict."""
        adv_file = self.adv_file() if external_adv else None
        meta = {
            "attacks": self.attacks,
            "order": self.order,
            "radii": self.radii,
            "norm": self.norm.value,
            "done": sorted([a, r] for a, r in self.done),
            "rejected": self.rejected,
            "seconds": self.seconds,
            "fingerprint": self.fingerprint,
        }
        if adv_file is not None:
            meta["adv_file"] = {"name": adv_file.name, "shape": list(self.x_adv.shape), "dtype": str(self.x_adv.dtype)}
        blob = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        out = {
            "meta_json": blob,
            "clean_correct": self.clean_correct.detach().cpu().contiguous(),
            "broken_by": self.broken_by.detach().cpu().contiguous(),
            "adv_radius": self.adv_radius.detach().cpu().contiguous(),
        }
        if adv_file is None:
            out["x_adv"] = self.x_adv.detach().cpu().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], adv_dir: "str | os.PathLike[str] | None" = None) -> "SuiteResult":
        """Inverse of :meth:`to_tensors` (``adv_dir``: where an external ``x_adv`` file lies); a malformed dict
        or a missing or mismatched ``x_adv`` file raises :class:`UsageError`."""
        need = {"meta_json", "clean_correct", "broken_by", "adv_radius"}
        if not isinstance(tensors, dict) or not need <= set(tensors):
            raise UsageError(f"not a suite state: expected keys {sorted(need | {'x_adv'})}")
        try:
            meta = json.loads(bytes(tensors["meta_json"].to(torch.uint8).tolist()).decode("utf-8"))
            x_adv = tensors.get("x_adv")
            if x_adv is None:
                x_adv = _external_adv(meta, adv_dir)
            result = cls(
                attacks=list(meta["attacks"]),
                order=list(meta["order"]),
                radii=[float(r) for r in meta["radii"]],
                norm=Norm.parse(meta["norm"]),
                clean_correct=tensors["clean_correct"].bool(),
                broken_by=tensors["broken_by"].long(),
                x_adv=x_adv,
                adv_radius=tensors["adv_radius"],
                done={(str(a), float(r)) for a, r in meta["done"]},
                rejected={str(k): int(v) for k, v in meta.get("rejected", {}).items()},
                seconds={str(k): float(v) for k, v in meta.get("seconds", {}).items()},
                fingerprint=[float(v) for v in meta.get("fingerprint", [])],
            )
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise UsageError(f"corrupt suite state: {exc}") from exc
        n, r = result.clean_correct.shape[0], len(result.radii)
        if result.broken_by.shape != (r, n) or result.adv_radius.shape != (n,) or result.x_adv.shape[0] != n:
            raise UsageError("corrupt suite state: tensor shapes do not match")
        return result


def _external_adv(meta: dict[str, Any], adv_dir: "str | os.PathLike[str] | None") -> torch.Tensor:
    """The spilled ``x_adv`` a state names (``meta["adv_file"]``), mapped from ``adv_dir``."""
    spec = meta.get("adv_file")
    if not isinstance(spec, dict):
        raise KeyError("x_adv")
    if adv_dir is None:
        raise ValueError("the state keeps x_adv in a file, but no directory to find it in was given")
    name = str(spec["name"])
    if Path(name).name != name or not name:
        raise ValueError(f"bad x_adv file name {name!r}")
    dtype = getattr(torch, str(spec["dtype"]).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"bad x_adv dtype {spec['dtype']!r}")
    return spill_open(Path(adv_dir) / name, tuple(int(s) for s in spec["shape"]), dtype)


def spills(spill: object) -> bool:
    """Whether a ``spill`` setting asks for a spilled ``x_adv`` and this platform can spill."""
    return spill is not None and spill is not False and spill_supported()


def _spill_path(spill: "str | os.PathLike[str] | bool") -> Path | None:
    return None if spill is True else Path(spill)  # type: ignore[arg-type]


def spilled_copy(x: torch.Tensor, spill: "str | os.PathLike[str] | bool") -> torch.Tensor:
    """A spilled copy of ``x`` on the CPU (the starting ``x_adv``), written batch by batch."""
    out = spill_empty(x.shape, x.dtype, _spill_path(spill))
    rows = max(1, (8 << 20) // max(1, x[0].numel() * x.element_size()))
    for s in range(0, x.shape[0], rows):
        out[s : s + rows] = x[s : s + rows].detach().cpu()
        release(out)
    return out


def respill(result: SuiteResult, x: torch.Tensor, spill: "str | os.PathLike[str] | bool") -> None:
    """A resumed result's ``x_adv`` in the spill file, with ``x`` back in every row no finished pair broke.

    A run killed inside an (attack, radius) pair may have written rows its saved state does not count:
    rows of samples the state has as never broken get ``x`` back; rows the state has as broken at a
    larger radius keep an adversarial example verified at a smaller one, which holds at theirs too."""
    if not is_spilled(result.x_adv):
        result.x_adv = spill_copy(result.x_adv, _spill_path(spill))
    unbroken = (~torch.isfinite(result.adv_radius.double())).nonzero().flatten()
    rows = max(1, (8 << 20) // max(1, x[0].numel() * x.element_size()))
    for s in range(0, unbroken.numel(), rows):
        part = unbroken[s : s + rows]
        put_rows(result.x_adv, part, x[part.to(x.device)].detach().cpu().to(result.x_adv.dtype))
