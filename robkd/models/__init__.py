"""Models: loading every format, the [0,1]-input wrapper, the architecture registry, saving."""

from robkd.models.io import build_model, check_compatible, detect_format, load_model, save_model
from robkd.models.registry import create_model, list_models, register_model
from robkd.models.wrapper import Normalize, RobustModel, as_robust_model

__all__ = [
    "build_model",
    "Normalize",
    "RobustModel",
    "as_robust_model",
    "check_compatible",
    "create_model",
    "detect_format",
    "list_models",
    "load_model",
    "register_model",
    "save_model",
]
