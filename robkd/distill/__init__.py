"""Training and robust distillation: objectives (st, at, trades, kd, ard, fast-ard, kdiga,
kdiga-ardc, kdiga-arda, rslad, iad, adaad, and the IGDM add-on), the :class:`Trainer`, the
:func:`train` / :func:`repair` API and ``repair(method="auto")`` (:mod:`robkd.distill.auto`).

Loss terms with their exact formulas live in :mod:`robkd.distill.losses`. A model's identity
(``teacher_sha256`` in provenance and training state) is :func:`robkd.models.identity.model_sha256`.

The names below are imported on first use, so that :mod:`robkd.distill.config` (which the CLI
reads for its choices and defaults) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_API = {
    "METHODS": "robkd.distill.config",
    "STUDENT_METHODS": "robkd.distill.config",
    "TEACHER_METHODS": "robkd.distill.config",
    "TrainConfig": "robkd.distill.config",
    "TrainLog": "robkd.distill.state",
    "TrainResult": "robkd.distill.api",
    "Trainer": "robkd.distill.trainer",
    "TrainingDivergedError": "robkd.errors",
    "evaluate_robust": "robkd.distill.evaluate",
    "load_train_state": "robkd.distill.state",
    "losses": "robkd.distill.losses",
    "repair": "robkd.distill.api",
    "train": "robkd.distill.api",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'robkd.distill' has no attribute {name!r}")
    module = importlib.import_module(_API[name])
    return module if module.__name__.endswith("." + name) else getattr(module, name)


def __dir__() -> list[str]:
    return __all__
