"""Checks before and during training: finite weights and outputs, labels within the classes, the models'
input shape and class count, and strict-JSON numbers for the epoch log."""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from robkd.data.core import ImageData
from robkd.distill.objectives import nonfinite_teacher
from robkd.errors import DataError, IncompatibleModelsError, ModelRuntimeError, RobkdError
from robkd.utils.logits import finite_rows


def _float_tensors(obj: "torch.nn.Module | Mapping[str, Any]") -> list[tuple[str, torch.Tensor]]:
    """The floating tensors of a module (parameters, then buffers) or of a state_dict, by name."""
    items = (list(obj.named_parameters()) + list(obj.named_buffers())) if isinstance(obj, torch.nn.Module) else list(obj.items())
    return [(k, t) for k, t in items if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]


def nonfinite_tensors(obj: "torch.nn.Module | Mapping[str, Any]") -> list[str]:
    """Names of the tensors of a module or state_dict that hold NaN or +-inf (``[]`` when all are finite).

    One device synchronisation when every tensor is finite (the per-step check of the trainer).
    """
    named = _float_tensors(obj)
    if not named:
        return []
    flags = [torch.isfinite(t).all() for _, t in named]
    if bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
        return []
    return [k for (k, _), f in zip(named, flags) if not bool(f)]


def short_list(names: list[str], limit: int = 3) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_finite_weights(model: torch.nn.Module, role: str, advice: str) -> None:
    """A :class:`ModelRuntimeError` when ``model`` has a NaN/inf parameter or buffer."""
    bad = nonfinite_tensors(model)
    if bad:
        raise ModelRuntimeError(f"the {role} has non-finite weights (NaN/inf in {short_list(bad)}): {advice}")


def check_label_range(data: ImageData, num_classes: int | None, whose: str = "the model's") -> None:
    """Every label of ``data`` must be a class of the model: in ``[0, num_classes)`` (only ``>= 0`` when unknown).

    :class:`ImageData` already refuses labels outside the classes a dataset declares; this checks them against
    the models being trained. Raises a one-line :class:`DataError` naming how many are out of range and the range.
    """
    y = data.y
    if y.numel() == 0:
        return
    bad = (y < 0) if num_classes is None else ((y < 0) | (y >= num_classes))
    n_bad = int(bad.sum())
    if n_bad:
        rng = "class indices >= 0" if num_classes is None else f"{whose} {num_classes} classes [0, {num_classes})"
        raise DataError(f"{data.name}: {n_bad} of {len(y)} labels are outside {rng} (labels found: "
                        f"{int(y.min())}..{int(y.max())})")


def probe_outputs(model: torch.nn.Module, x: torch.Tensor, role: str) -> torch.Tensor:
    """The logits of ``model`` on the CPU batch ``x`` (eval mode, no gradients), checked to be float ``(B, K)``.

    A model that raises or returns anything else is a one-line :class:`ModelRuntimeError`.
    """
    from robkd.utils.modules import eval_mode, model_device

    try:
        with eval_mode(model), torch.no_grad():
            out = model(x.to(model_device(model)))
    except RobkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model failed: one line, exit 2
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelRuntimeError(f"the {role} failed on a batch of {len(x)} training images ({type(exc).__name__}: {first})") from exc
    if not isinstance(out, torch.Tensor):
        raise ModelRuntimeError(f"the {role} returned {type(out).__name__}, not a tensor of logits")
    if out.dim() != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 1:
        raise ModelRuntimeError(f"the {role} returned outputs of shape {list(out.shape)} for a batch of {x.shape[0]} "
                                f"images: a classifier returns (batch, classes) logits")
    if not out.is_floating_point():
        raise ModelRuntimeError(f"the {role} returned {out.dtype} outputs: a classifier returns float logits")
    return out


def check_input_shape(model: torch.nn.Module, data: ImageData, role: str) -> None:
    """The model's declared input shape (``model.meta``, when it has one) must be the data's."""
    meta = getattr(model, "meta", None)
    if meta is None:
        return
    if meta.input_shape is not None and tuple(meta.input_shape) != tuple(data.input_shape):
        raise IncompatibleModelsError(f"the {role} takes inputs of shape {list(meta.input_shape)} but the data has {list(data.input_shape)}")


def check_models(student: torch.nn.Module, teacher: torch.nn.Module | None, train_data: ImageData,
                 val_data: ImageData | None, batch_size: int) -> None:
    """Before any training: finite weights, float ``(B, K)`` finite outputs of both models on a first batch
    of training images, one class count for teacher and student, and every label in ``[0, K)``."""
    datas = [train_data] + ([val_data] if val_data is not None else [])
    meta_k = getattr(getattr(student, "meta", None), "num_classes", None)
    for d in datas:  # negative labels (and labels beyond a known class count) before any model runs
        check_label_range(d, meta_k, "the student's")
    check_finite_weights(student, "student", "training cannot start from it (re-initialise it, e.g. --from-scratch)")
    if teacher is not None:
        check_finite_weights(teacher, "teacher", "a NaN/inf teacher cannot be distilled")
    x = train_data.float_x(slice(0, min(len(train_data), batch_size, 64)))
    k = int(probe_outputs(student, x, "student").shape[1])
    if teacher is not None:
        t_out = probe_outputs(teacher, x, "teacher")
        bad = int((~finite_rows(t_out)).sum())
        if bad:
            raise nonfinite_teacher(bad, len(x), "training images")
        if int(t_out.shape[1]) != k:
            raise IncompatibleModelsError(f"the teacher returns {int(t_out.shape[1])} classes but the student returns {k}")
    for d in datas:
        check_label_range(d, k, "the models'")


def finite_or_none(obj: Any) -> Any:
    """``obj`` (nested dicts/lists) with every NaN/inf float replaced by ``None``, so that it is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


#: a run whose best validation clean accuracy stays below this multiple of chance (1 / classes) is flagged
CHANCE_FACTOR = 1.5


def chance_level_warning(records: list[Mapping[str, Any]], num_classes: int | None) -> str | None:
    """Why a finished run looks like it never learned (its best validation clean accuracy below
    :data:`CHANCE_FACTOR` x chance: a near-constant predictor), or None (it learned, or no validation ran)."""
    vals = [float(r["val_clean"]) for r in records if isinstance(r.get("val_clean"), (int, float))]
    if not vals or not num_classes or num_classes < 2:
        return None
    best, chance = max(vals), 1.0 / num_classes
    if best >= CHANCE_FACTOR / num_classes:
        return None
    return (f"training never left chance level: the best validation clean accuracy in {len(vals)} epoch(s) was "
            f"{best:.3f} (chance {chance:.3f}), a near-constant predictor; adversarial training from scratch at a large "
            "radius can stay at that solution: grow the radius with --eps-warmup (e.g. 0.2), lower --lr, or start from a "
            "clean-trained model")
