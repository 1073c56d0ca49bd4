"""Loading a model file of any supported format as a [0,1]-input :class:`RobustModel`, and checking that
a teacher and a student can be compared."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from robkd.errors import IncompatibleModelsError, ModelLoadError
from robkd.models.formats import LOADERS, detect_format
from robkd.models.messages import first_line
from robkd.models.metadata import apply_overrides, data_hints
from robkd.models.registry import split_arch
from robkd.models.robustbench import KIND as RB_KIND
from robkd.models.robustbench import check_flags as check_robustbench_flags
from robkd.models.robustbench import load_robustbench
from robkd.models.wrapper import RobustModel
from robkd.types import ModelMeta
from robkd.utils.modules import model_device


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    dataset: Any = None,
) -> RobustModel:
    """Load a model file of any supported format as a [0,1]-input :class:`RobustModel` in eval mode.

    ``arch`` (``robkd:<name>``, ``timm:<name>``, ``module.path:Factory`` or, with the optional
    ``robustbench`` package, ``robustbench:<model id>``) is needed for plain state_dicts; ``mean``/``std``/``num_classes``/``input_shape``
    complete the metadata (a value contradicting what the file itself carries is an error).
    A robkd checkpoint whose architecture is user code (``module.path:Factory``) is built
    only when ``arch`` names that same architecture or ``allow_pickle`` is set; a
    ``torch.export`` program holding pickled objects beyond tensors needs ``allow_pickle``. ``dataset`` (a registered name such as
    ``"cifar10"``, or loaded :class:`~robkd.data.ImageData`) tells a plain state_dict's
    architecture the input shape and number of classes when neither the file nor the
    flags give them; it never overrides a checkpoint's own metadata, and never
    supplies the normalisation. Loading is strict.
    """
    p = Path(path)
    fmt = detect_format(p)
    flags = ModelMeta(
        arch=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        num_classes=num_classes,
        input_shape=tuple(input_shape) if input_shape is not None else None,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )
    flags.validate()  # UsageError naming the bad value (bounds in robkd.types)
    loader = LOADERS[fmt]
    if arch and split_arch(arch)[0] == RB_KIND and fmt in ("safetensors", "torch"):  # RobustBench's model zoo
        check_robustbench_flags(arch, mean, std)
        net, meta = load_robustbench(p, arch, num_classes=flags.num_classes or data_hints(dataset)[1])
    elif fmt in ("safetensors", "torch"):  # weights only: the data may say what the architecture needs
        shape, classes = data_hints(dataset)
        hinted = dataclasses.replace(flags, input_shape=flags.input_shape or shape, num_classes=flags.num_classes or classes)
        net, meta = loader(p, hinted, allow_pickle)
    else:
        net, meta = loader(p, flags, allow_pickle)
    meta.source = {"path": str(p), "format": fmt}
    apply_overrides(meta, flags)
    model = RobustModel(net, meta)
    model.to(device)
    model.eval()
    if meta.input_shape is not None:
        _check_outputs(model)
    return model


def infer_num_classes(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Number of logits from one forward pass on two zero images; :class:`ModelLoadError` unless the
    model returns floating-point ``(2, classes)`` logits."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=model_device(model)))
    except Exception as exc:  # user models fail in many ways
        raise ModelLoadError(f"model does not accept inputs of shape {list(input_shape)}: {first_line(exc)}") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(f"model output for a batch of 2 images has shape {got}; expected (batch, classes) logits")
    if not out.dtype.is_floating_point:
        raise ModelLoadError(f"model returns {out.dtype} outputs; expected floating-point logits")
    return int(out.shape[1])


def check_compatible(teacher: RobustModel, student: RobustModel) -> None:
    """Raise :class:`IncompatibleModelsError` unless classes and input shapes agree."""
    t, s = teacher.meta, student.meta
    if t.num_classes is not None and s.num_classes is not None and t.num_classes != s.num_classes:
        raise IncompatibleModelsError(f"teacher has {t.num_classes} classes but student has {s.num_classes}")
    if t.input_shape is not None and s.input_shape is not None and tuple(t.input_shape) != tuple(s.input_shape):
        raise IncompatibleModelsError(
            f"teacher takes inputs of shape {list(t.input_shape)} but student takes {list(s.input_shape)}"
        )


def _check_outputs(model: RobustModel) -> None:
    """Probe the model once at its input shape: its output width must be the number of classes its
    metadata declares (filled in when it declares none)."""
    meta = model.meta
    k = infer_num_classes(model, meta.input_shape)
    if k < 1:
        raise ModelLoadError("model returns zero logits per image")
    if meta.num_classes is None:
        meta.num_classes = k
    elif meta.num_classes != k:
        raise ModelLoadError(f"model metadata says {meta.num_classes} classes but the model outputs {k} logits "
                             f"for inputs of shape {list(meta.input_shape)}")
