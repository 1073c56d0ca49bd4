"""Models: loading every format, the [0,1]-input wrapper, the architecture registry, saving.

Where things are: :mod:`.load` (``load_model``, ``check_compatible``), :mod:`.formats` (format
detection and one loader per format), :mod:`.build` (architectures built under a size guard),
:mod:`.save`, :mod:`.metadata` (the checkpoint's ``robkd`` entry), :mod:`.weights` (state_dicts),
:mod:`.safetensors_header`, :mod:`.registry` and :mod:`.archs` (architectures), :mod:`.wrapper`
(``RobustModel``), :mod:`.identity` (``model_sha256``).
"""

from robkd.models import archs  # noqa: F401 - registers the built-in architectures
from robkd.models.build import build_model
from robkd.models.formats import detect_format
from robkd.models.load import check_compatible, load_model
from robkd.models.registry import create_model, list_models, register_model
from robkd.models.save import save_model
from robkd.models.wrapper import Normalize, RobustModel, as_robust_model, in_memory_model

__all__ = [
    "build_model",
    "Normalize",
    "RobustModel",
    "as_robust_model",
    "check_compatible",
    "in_memory_model",
    "create_model",
    "detect_format",
    "list_models",
    "load_model",
    "register_model",
    "save_model",
]
