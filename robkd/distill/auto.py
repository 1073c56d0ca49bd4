"""``--method auto``: short trials of candidate methods and weights, ranked on a validation split, then the
winner continued until the gate clears on validation (with margin) or the time budget runs out.

* **Validation only.** The validation split the trainer carves from the training data is split again (seeded):
  one half selects epochs inside every run (as in any repair), the other ranks the trials and estimates the
  gate. The test set is never touched; the final audit after the repair is the usual one.
* **Ranking.** Each trial is a short run (``trial_epochs`` passes, on ``trial_n`` training images) of one
  candidate from the student as given. It is scored by the one-sided 95% Clopper-Pearson lower bound of its
  validation robust accuracy (PGD-``rank_steps`` at the gate's radius, step ``2.5 eps / steps``), among the trials
  whose clean accuracy drops at most ``max_clean_drop`` below the reference (the student as given; the teacher
  for a new student); ties go to the higher clean accuracy. When no trial meets the cap, the smallest drop wins.
* **Continuation.** The winner's configuration runs again in rounds of ``round_epochs`` passes on the whole
  training split, each from the best weights so far, until the gate holds on validation under the audit's own
  95% judging (every student and teacher metric replaced by its Clopper-Pearson interval: "with margin"), a
  round fails to beat the best (the next one would start from the same weights with the same settings and
  repeat it), the next round would overrun the budget (estimated from the last one), or ``max_rounds`` rounds
  are done. The
  weights kept are those of the best unit (trial or round) by the same ranking.
* **Resumable.** Every finished trial and round is written (weights and record, atomically) under the state
  directory; a killed run resumes the unfinished unit from its training state and skips the finished ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from robkd.distill.config import STUDENT_METHODS, TrainConfig
from robkd.distill.evaluate import evaluate_robust
from robkd.distill.state import TrainLog
from robkd.distill.trainer import Trainer
from robkd.errors import UsageError
from robkd.utils.io import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

#: the candidates tried by default: every recent method at its paper defaults, plus weight variants
DEFAULT_CANDIDATES: tuple[dict[str, Any], ...] = (
    {"method": "rslad"}, {"method": "rslad", "alpha": 1.0}, {"method": "adaad"}, {"method": "iad"},
    {"method": "ard", "alpha": 0.5, "temperature": 1.0}, {"method": "kdiga-ardc"},
    {"method": "rslad", "igdm": True}, {"method": "adaad", "igdm": True}, {"method": "ard", "igdm": True, "temperature": 1.0},
)
#: the options a candidate sets (reset to their defaults first: auto chooses the objective, the user the rest)
OBJECTIVE_KEYS = ("method", "alpha", "temperature", "lambda_ce", "lambda_kl", "lambda_iga", "iga_form", "beta",
                  "iad_beta", "iad_warmup", "igdm", "lambda_igdm", "replays")
AUTO_FILE = "auto.json"
AUTO_VERSION = 1

_BUDGET = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)\s*h)?\s*(?:(\d+(?:\.\d+)?)\s*m)?\s*(?:(\d+(?:\.\d+)?)\s*s)?\s*$", re.I)


def parse_budget(text: Any) -> float:
    """Seconds from ``2h``, ``90m``, ``1h30m``, ``45s``, ``1.5h`` or a plain number of seconds; must be > 0."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        sec = float(text)
    else:
        s = str(text or "").strip()
        m = _BUDGET.match(s) if s else None
        if s and re.fullmatch(r"\d+(?:\.\d+)?", s):
            sec = float(s)
        elif m and any(m.groups()):
            h, mi, se = (float(g) if g else 0.0 for g in m.groups())
            sec = 3600 * h + 60 * mi + se
        else:
            raise UsageError(f"bad --budget {text!r}: give a duration such as 2h, 90m, 1h30m or 45s")
    if not math.isfinite(sec) or sec <= 0:
        raise UsageError(f"--budget must be a positive duration, got {text!r}")
    return sec


@dataclasses.dataclass
class AutoOptions:
    """The settings of ``--method auto`` (see the module docstring)."""

    gates: list[str]
    budget_s: float
    candidates: list[dict[str, Any]] = dataclasses.field(default_factory=lambda: [dict(c) for c in DEFAULT_CANDIDATES])
    trial_epochs: int = 1
    trial_n: int | None = None
    round_epochs: int = 1
    max_rounds: int = 20
    max_clean_drop: float = 0.10
    rank_n: int = 1000
    rank_steps: int = 20
    trial_share: float = 0.5

    @classmethod
    def build(cls, gates: Sequence[str] | str | None, budget: Any, extra: Mapping[str, Any] | None = None) -> "AutoOptions":
        """Validated options (a :class:`UsageError` names the first bad one)."""
        from robkd.auditing.gates import parse_gate

        gl = [gates] if isinstance(gates, str) else list(gates or [])
        if not gl:
            raise UsageError("--method auto repairs until a gate passes: give --gate, e.g. "
                             "\"student.worst@0.1 >= 0.9*teacher.worst@0.1\"")
        for g in gl:
            for r in parse_gate(g).refs():
                if r.subject == "transfer" or r.metric not in ("clean", "worst"):
                    raise UsageError(f"--method auto estimates gates on validation from clean and worst@R figures only; "
                                     f"{r.text!r} in {g!r} is not one")
        names = {f.name for f in dataclasses.fields(cls)} - {"gates", "budget_s"}
        unknown = sorted(set(extra or {}) - names)
        if unknown:
            raise UsageError(f"unknown auto option(s) {unknown}; known: {sorted(names)}")
        o = cls(gl, parse_budget(budget), **{k: v for k, v in dict(extra or {}).items() if v is not None})
        if not isinstance(o.candidates, list) or not o.candidates:
            raise UsageError("auto candidates must be a non-empty list of option objects")
        for c in o.candidates:
            if not isinstance(c, dict) or c.get("method") not in STUDENT_METHODS or c.get("method") == "fast-ard":
                raise UsageError(f"bad auto candidate {c!r}: an object with a 'method' among "
                                 f"{', '.join(m for m in STUDENT_METHODS if m != 'fast-ard')}")
            bad = sorted(set(c) - set(OBJECTIVE_KEYS))
            if bad:
                raise UsageError(f"auto candidate {c!r} sets {bad}: a candidate sets only objective options {list(OBJECTIVE_KEYS)}")
        for name in ("trial_epochs", "round_epochs", "max_rounds", "rank_n", "rank_steps"):
            v = getattr(o, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "max_rounds" else 1):
                raise UsageError(f"auto option {name} must be a positive integer, got {v!r}")
        if o.trial_n is not None and (not isinstance(o.trial_n, int) or o.trial_n < 1):
            raise UsageError(f"auto option trial_n must be a positive integer, got {o.trial_n!r}")
        if not 0.0 <= float(o.max_clean_drop) <= 1.0 or not 0.0 < float(o.trial_share) <= 1.0:
            raise UsageError("auto options: max_clean_drop must be in [0, 1] and trial_share in (0, 1]")
        return o

    def radii(self) -> list[float]:
        """The radii the gates name (the validation attack runs at each)."""
        from robkd.auditing.gates import parse_gate

        return sorted({r.radius for g in self.gates for r in parse_gate(g).refs() if r.radius is not None})


def candidate_config(base: TrainConfig, cand: Mapping[str, Any], epochs: int, train_n: int | None) -> TrainConfig:
    """``base`` (the user's schedule, attack and data options) with the objective options of ``cand``."""
    d = base.to_dict()
    fresh = TrainConfig().to_dict()
    d.update({k: fresh[k] for k in OBJECTIVE_KEYS})
    d.update(dict(cand))
    d["epochs"] = int(epochs)
    d["train_n"] = train_n
    return TrainConfig.from_dict(d)


def label(cand: Mapping[str, Any]) -> str:
    """``rslad+igdm (alpha=1)``-style name of a candidate."""
    name = cand["method"] + ("+igdm" if cand.get("igdm") else "")
    w = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in cand.items() if k not in ("method", "igdm"))
    return f"{name} ({w})" if w else name


class _Store:
    """``auto.json`` and the unit files in the state directory (nothing is written without one)."""

    def __init__(self, root: Path | None, header: dict[str, Any], resume: bool) -> None:
        self.root, self.header = root, header
        self._weights: dict[str, dict[str, torch.Tensor]] = {}
        self.data: dict[str, Any] = {"format": "robkd-auto", "version": AUTO_VERSION, **header, "units": {}, "elapsed_s": 0.0}
        if root is None:
            return
        root.mkdir(parents=True, exist_ok=True)
        f = root / AUTO_FILE
        if resume and f.exists():
            saved = json.loads(f.read_text(encoding="utf-8"))
            diff = sorted(k for k in header if saved.get(k) != json.loads(json.dumps(header[k])))
            if saved.get("version") != AUTO_VERSION or diff:
                raise UsageError(f"cannot resume --method auto from {f}: its settings differ ({', '.join(diff) or 'version'}); "
                                 f"use the same options or a new --state file")
            self.data = saved
            log.info("auto: resuming (%d finished trials/rounds)", len(saved["units"]))

    def done(self, key: str) -> dict[str, Any] | None:
        return self.data["units"].get(key)

    def unit_state(self, key: str) -> Path | None:
        return None if self.root is None else self.root / f"{key}.state.pt"

    def finish(self, key: str, record: dict[str, Any], weights: dict[str, torch.Tensor]) -> None:
        self.data["units"][key] = record
        self.data["elapsed_s"] = float(self.data["elapsed_s"]) + float(record["seconds"])
        self._weights[key] = weights
        if self.root is not None:
            with atomic_path(self.root / f"{key}.pt") as tmp:
                torch.save(weights, str(tmp))
            atomic_write_json(self.root / AUTO_FILE, self.data)

    def weights(self, key: str) -> dict[str, torch.Tensor]:
        if key in self._weights:
            return self._weights[key]
        return torch.load(str(self.root / f"{key}.pt"), map_location="cpu", weights_only=True)


def _proportion(k: int, n: int) -> dict[str, float]:
    from robkd.utils.stats import clopper_pearson, clopper_pearson_lower

    lo, hi = clopper_pearson(k, n, 0.95)
    return {"k": k, "n": n, "point": k / n, "low": lo, "high": hi, "lower_one_sided": clopper_pearson_lower(k, n, 0.05)}


def _measure(model: torch.nn.Module, data, radii: list[float], base: TrainConfig, steps: int) -> dict[str, Any]:
    """Clean and PGD-``steps`` robust counts of ``model`` on ``data`` at every radius."""
    n = len(data)
    out: dict[str, Any] = {}
    for r in radii:
        c, rob = evaluate_robust(model, data, norm=base.norm, eps=r, steps=steps, step_size=2.5 * r / steps, seed=base.seed + 777)
        out["clean"] = _proportion(int(round(c * n)), n)
        out[f"worst@{r:g}"] = _proportion(int(round(rob * n)), n)
    if not radii:
        c, _ = evaluate_robust(model, data, norm=base.norm, eps=0.0, steps=0, step_size=0.0)
        out["clean"] = _proportion(int(round(c * n)), n)
    return out


def _gate_verdicts(gates: list[str], student: Mapping[str, Any], teacher: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The gates judged on validation by the audit's 95% interval judgement."""
    from robkd.auditing.gates import Interval
    from robkd.auditing.judging import judge

    figs = {"student": student, "teacher": teacher}

    def lookup(ref):
        key = "clean" if ref.metric == "clean" else f"worst@{ref.radius:g}"
        p = figs[ref.subject].get(key)
        return None if p is None else Interval(p["point"], p["low"], p["high"])

    return [{"gate": g, "passed": (v := judge(g, lookup, on="lower")).passed, "reason": v.reason} for g in gates]


def _headline(opts: AutoOptions) -> str:
    r = opts.radii()
    return f"worst@{max(r):g}" if r else "clean"


def run_auto(student: torch.nn.Module, teacher: torch.nn.Module, *, base: TrainConfig, tr, va, opts: AutoOptions,
             dataset: str | None, default_eps: float | None, state_dir: Path | None, resume: bool,
             show_progress: bool) -> tuple[Trainer, TrainLog, dict[str, Any]]:
    """Trials, ranking and continuation (module docstring). Leaves the kept weights in ``student``; returns a
    :class:`Trainer` of the kept configuration (for the provenance), its training log and the ``auto`` block."""
    from robkd.data import eval_subset, train_val_split

    t0 = time.perf_counter()
    va_sel, va_rank = train_val_split(va, 0.5, base.seed + 1)
    va_rank = eval_subset(va_rank, min(opts.rank_n, len(va_rank)), seed=base.seed)
    radii, key = opts.radii(), _headline(opts)
    header = {"options": {k: v for k, v in dataclasses.asdict(opts).items() if k != "budget_s"}, "budget_s": opts.budget_s,
              "base": base.to_dict(), "validation_sizes": [len(va_sel), len(va_rank)]}
    store = _Store(state_dir, json.loads(json.dumps(header)), resume)
    teacher_figs = store.data.get("teacher") or _measure(teacher, va_rank, radii, base, opts.rank_steps)
    initial = copy.deepcopy(student.state_dict())
    ref_figs = store.data.get("reference") or _measure(student, va_rank, radii, base, opts.rank_steps)
    store.data["teacher"], store.data["reference"] = teacher_figs, ref_figs
    ref_clean = ref_figs["clean"]["point"]

    def score(rec):  # ranking key: (eligible, lower bound of the headline robust accuracy, clean)
        return (rec["eligible"], rec["figures"][key]["lower_one_sided"], rec["figures"]["clean"]["point"])

    def run_unit(unit: str, cfg: TrainConfig, start: dict[str, torch.Tensor], data) -> dict[str, Any]:
        done = store.done(unit)
        if done is not None:
            return done
        u0 = time.perf_counter()
        student.load_state_dict(start)
        tr_ = Trainer(student, cfg, data, va_sel, teacher, dataset=dataset, default_eps=default_eps,
                      state_path=store.unit_state(unit), show_progress=show_progress)
        tlog = tr_.fit(resume=resume)
        figs = _measure(student, va_rank, radii, base, opts.rank_steps)
        drop = ref_clean - figs["clean"]["point"]
        rec = {"unit": unit, "figures": figs, "clean_drop": drop, "eligible": drop <= opts.max_clean_drop + 1e-12,
               "gates": _gate_verdicts(opts.gates, figs, teacher_figs), "seconds": round(time.perf_counter() - u0, 3),
               "selected_epoch": tlog.selected_epoch, "log": tlog.to_dict()}
        store.finish(unit, rec, copy.deepcopy(student.state_dict()))
        log.info("auto %s: val clean %.3f, val %s %.3f (lower %.3f)%s", unit, figs["clean"]["point"], key,
                 figs[key]["point"], figs[key]["lower_one_sided"], "" if rec["eligible"] else " (over the clean cap)")
        return rec

    trial_data = tr if opts.trial_n is None else eval_subset(tr, min(opts.trial_n, len(tr)), seed=base.seed)
    trials: list[dict[str, Any]] = []
    for i, cand in enumerate(opts.candidates):
        unit = f"trial-{i}"
        spent = float(store.data["elapsed_s"])
        mean = spent / max(1, len(trials)) if trials else 0.0
        if store.done(unit) is None and trials and spent + mean > opts.trial_share * opts.budget_s:
            trials.append({"unit": unit, "candidate": cand, "skipped": "the trials' share of the budget is spent"})
            continue
        cfg = candidate_config(base, cand, opts.trial_epochs, None)
        rec = run_unit(unit, cfg, initial, trial_data)
        trials.append({**rec, "candidate": cand})
    ran = [t for t in trials if "skipped" not in t]
    eligible = [t for t in ran if t["eligible"]]
    if eligible:
        win = max(eligible, key=score)
        why = (f"highest one-sided 95% lower bound of validation robust accuracy ({key}: "
               f"{win['figures'][key]['lower_one_sided']:.3f}) among the {len(eligible)} trial(s) losing at most "
               f"{opts.max_clean_drop:g} clean accuracy")
    else:
        win = max(ran, key=lambda t: (t["figures"]["clean"]["point"], t["figures"][key]["lower_one_sided"]))
        why = f"no trial kept clean accuracy within {opts.max_clean_drop:g} of the reference: the smallest drop wins"
    win_cfg_cand = win["candidate"]
    best = win
    rounds: list[dict[str, Any]] = []
    stop = "the gate holds on validation (95% judging)" if all(v["passed"] for v in win["gates"]) else None
    last_s = float(win["seconds"]) * max(1, len(tr)) / max(1, len(trial_data)) * opts.round_epochs / opts.trial_epochs
    r = 0
    while stop is None:
        if r >= opts.max_rounds:
            stop = f"{opts.max_rounds} continuation round(s) done"
            break
        unit = f"round-{r}"
        if store.done(unit) is None and float(store.data["elapsed_s"]) + last_s > opts.budget_s:
            stop = "the budget would be overrun by another round"
            break
        cfg = candidate_config(base, win_cfg_cand, opts.round_epochs, base.train_n)
        rec = run_unit(unit, cfg, store.weights(best["unit"]), tr)
        rounds.append(rec)
        last_s = float(rec["seconds"])
        repeat = score(rec) < score(best)
        if not repeat:
            best = rec
        if all(v["passed"] for v in rec["gates"]):
            stop = "the gate holds on validation (95% judging)"
        elif repeat:  # the next round would start from the same weights with the same settings: it would repeat this one
            stop = f"{unit} did not beat {best['unit']}: another round from the same weights would repeat it"
        r += 1
    student.load_state_dict(store.weights(best["unit"]))
    kept_epochs = opts.trial_epochs if best["unit"].startswith("trial") else opts.round_epochs
    final = Trainer(student, candidate_config(base, win_cfg_cand, kept_epochs, base.train_n), tr, va_sel, teacher,
                    dataset=dataset, default_eps=default_eps, show_progress=False)
    tl = best["log"]
    tlog = TrainLog(tl["records"], tl["config"], True, tl["selected_epoch"], tl["global_step"])
    block = _block(opts, trials, rounds, win, best, why, stop, teacher_figs, ref_figs, key, store, t0, va_sel, va_rank)
    return final, tlog, block


def _row(rec: Mapping[str, Any], key: str) -> dict[str, Any]:
    f = rec["figures"]
    return {"val_clean": f["clean"]["point"], "val_robust": f[key]["point"], "robust_lower": f[key]["lower_one_sided"],
            "clean_drop": rec["clean_drop"], "eligible": rec["eligible"], "seconds": rec["seconds"],
            "gate_on_validation": all(v["passed"] for v in rec["gates"])}


def _block(opts, trials, rounds, win, best, why, stop, teacher_figs, ref_figs, key, store, t0, va_sel, va_rank) -> dict[str, Any]:
    """The ``auto`` block of the repair result."""
    rows = []
    for t in trials:
        row = {"unit": t["unit"], "method": t["candidate"]["method"] + ("+igdm" if t["candidate"].get("igdm") else ""),
               "weights": {k: v for k, v in t["candidate"].items() if k not in ("method",)}, "label": label(t["candidate"])}
        if "skipped" in t:
            row.update(skipped=t["skipped"], chosen=False, why=t["skipped"])
        else:
            row.update(_row(t, key), chosen=t is win,
                       why=why if t is win else ("over the clean-accuracy cap" if not t["eligible"] else "lower bound not the highest"))
        rows.append(row)
    return {
        "gates": list(opts.gates), "budget_s": opts.budget_s, "elapsed_s": round(float(store.data["elapsed_s"]), 3),
        "wall_s_this_call": round(time.perf_counter() - t0, 3), "metric": key,
        "validation": {"select_n": len(va_sel), "rank_n": len(va_rank), "attack": f"pgd-{opts.rank_steps}",
                       "split": "validation split carved from the training data (never the test set), halved: "
                                "epoch selection / ranking and gate estimate"},
        "max_clean_drop": opts.max_clean_drop, "reference_clean": ref_figs["clean"]["point"],
        "teacher": {k: v["point"] for k, v in teacher_figs.items()},
        "trials": rows, "chosen": win["unit"], "why": why,
        "rounds": [{"unit": r["unit"], **_row(r, key)} for r in rounds], "kept": best["unit"], "stopped": stop,
        "gate_on_validation": best["gates"],
    }


def auto_table(block: Mapping[str, Any]) -> str:
    """The trial table (markdown) of an ``auto`` block."""
    lines = [f"`--method auto`: trials ranked by the one-sided 95% lower bound of validation robust accuracy "
             f"({block['metric']}, {block['validation']['attack']}, {block['validation']['rank_n']} validation images), "
             f"clean-accuracy loss capped at {block['max_clean_drop']:g}.", "",
             "| trial | method | val clean | val robust | lower bound | chosen | why |", "|---|---|---|---|---|---|---|"]
    for t in block["trials"]:
        if "skipped" in t:
            lines.append(f"| {t['unit']} | {t['label']} | - | - | - | no | {t['why']} |")
        else:
            lines.append(f"| {t['unit']} | {t['label']} | {t['val_clean']:.3f} | {t['val_robust']:.3f} | {t['robust_lower']:.3f} | "
                         f"{'**yes**' if t['chosen'] else 'no'} | {t['why']} |")
    for r in block["rounds"]:
        lines.append(f"| {r['unit']} | continued | {r['val_clean']:.3f} | {r['val_robust']:.3f} | {r['robust_lower']:.3f} | "
                     f"{'kept' if r['unit'] == block['kept'] else ''} | gate on validation: {'holds' if r['gate_on_validation'] else 'not yet'} |")
    lines += ["", f"Kept: {block['kept']}. Stopped: {block['stopped']}. Time: {block['elapsed_s']:.0f} s of {block['budget_s']:.0f} s."]
    return "\n".join(lines) + "\n"
