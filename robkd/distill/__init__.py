"""Training and robust distillation: objectives (st, at, trades, kd, ard, fast-ard, kdiga,
kdiga-ardc, kdiga-arda), the :class:`Trainer`, and the :func:`train` / :func:`repair` API.

Loss terms with their exact formulas live in :mod:`robkd.distill.losses`.
"""

from robkd.distill import losses
from robkd.distill.api import TrainResult, model_sha256, repair, train
from robkd.distill.config import METHODS, STUDENT_METHODS, TEACHER_METHODS, TrainConfig
from robkd.distill.trainer import Trainer, TrainingDivergedError, TrainLog, evaluate_robust, load_train_state

__all__ = [
    "METHODS",
    "STUDENT_METHODS",
    "TEACHER_METHODS",
    "TrainConfig",
    "TrainLog",
    "TrainResult",
    "Trainer",
    "TrainingDivergedError",
    "evaluate_robust",
    "load_train_state",
    "losses",
    "model_sha256",
    "repair",
    "train",
]
