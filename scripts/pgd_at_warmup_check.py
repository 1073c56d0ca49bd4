#!/usr/bin/env python
"""PGD-AT teachers of the all-methods experiment trained with and without ``--eps-warmup``.

Trains the PGD-AT teacher of ``scripts/table3_all_methods.py`` (the same settings: ``train_settings``) for each
seed, once as the experiment does (no warm-up) and once with the radius grown over ``--warmup`` of the run, and
writes per-epoch cross-entropy and validation accuracies to ``--out`` (``pgd_at_warmup.md`` / ``.json``). It
checks whether the warm-up rescues the teacher that stayed at the constant predictor (the experiment's seed 2)
without hurting the ones that trained. Resumable (runs under ``--work``)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/pgd_at_warmup_check.py --seeds 0,1,2,3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table3_all_methods import _args as table3_args, train_settings  # noqa: E402  (the experiment's own settings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3")
    ap.add_argument("--warmup", type=float, default=0.25, help="--eps-warmup of the second teacher (fraction of the run)")
    ap.add_argument("--out", default="reports/table3_all")
    ap.add_argument("--work", default="runs/pgd_at_warmup")
    ap.add_argument("--smoke", action="store_true", help="the experiment's smoke sizes (bundled slice, 1 epoch)")
    a = ap.parse_args(argv)
    t3 = table3_args(["--smoke"] if a.smoke else [])
    import torch

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    os.environ.setdefault("ROBKD_NO_PROGRESS", "1")
    from robkd.distill import train
    from robkd.distill.checks import chance_level_warning

    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        for warm in (0.0, a.warmup):
            stem = f"s{seed}_warmup{round(warm * 1000):04d}"  # no dot in the name
            if not (work / f"{stem}.pt").exists():
                train("at", "robkd:cnn_small", epochs=t3.teacher_epochs, out=work / f"{stem}.pt", arch_kwargs={"width": 2},
                      state_path=work / f"{stem}.state.pt", log_path=work / f"{stem}.log.jsonl", resume=True,
                      eps_warmup=warm, **train_settings(t3, seed))
            recs = [json.loads(x) for x in (work / f"{stem}.log.jsonl").read_text().splitlines() if x.strip()]
            rows.append({"seed": seed, "eps_warmup": warm, "stuck": chance_level_warning(recs, 10) is not None,
                         "epochs": [{k: r.get(k) for k in ("epoch", "ce_adv", "train_eps", "val_clean", "val_robust")} for r in recs],
                         "best_val_clean": max(r["val_clean"] for r in recs), "best_val_robust": max(r["val_robust"] for r in recs)})
    import robkd

    meta = {"robkd": robkd.__version__, "torch": torch.__version__, "warmup": a.warmup, "teacher_epochs": t3.teacher_epochs,
            "settings": {k: v for k, v in train_settings(t3, 0).items() if k not in ("seed", "data_dir", "show_progress")}}
    (out / "pgd_at_warmup.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# PGD-AT teachers with and without a radius warm-up", "",
             f"The all-methods experiment's teacher settings ({t3.teacher_epochs} epochs, eps 0.1, lr {t3.lr:g}); "
             f"`eps_warmup` {a.warmup:g} grows the training radius linearly over that fraction of the optimizer steps. "
             "Validation attacks at the full radius (PGD-10, the validation split). Output of "
             "`scripts/pgd_at_warmup_check.py`.", "",
             "| seed | eps_warmup | CE per epoch (train) | val clean per epoch | val robust per epoch | never left chance |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        def col(k):
            return " ".join(f"{e[k]:.3f}" for e in r["epochs"])

        lines.append(f"| {r['seed']} | {r['eps_warmup']:g} | {col('ce_adv')} | {col('val_clean')} | {col('val_robust')} | "
                     f"{'yes' if r['stuck'] else 'no'} |")
    (out / "pgd_at_warmup.md").write_text("\n".join(lines) + "\n")
    logging.getLogger("warmup").info("wrote %s", out / "pgd_at_warmup.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
