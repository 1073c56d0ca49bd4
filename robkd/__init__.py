"""robkd: did the distilled student keep the teacher's adversarial robustness? If not, fix it.

The public API is imported lazily so that ``import robkd`` (and ``robkd --help``)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = {
    "load_model": "robkd.models",
    "save_model": "robkd.models",
    "build_model": "robkd.models",
    "create_model": "robkd.models",
    "RobustModel": "robkd.models",
    "load_dataset": "robkd.data",
    "audit": "robkd.auditing",
    "evaluate": "robkd.auditing",
    "EvaluationResult": "robkd.auditing",
    "certify": "robkd.bounds",
    "train": "robkd.distill",
    "repair": "robkd.distill",
    "Norm": "robkd.types",
    "RobkdError": "robkd.errors",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'robkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
