"""The Trainer: SGD + a real LR schedule, augmentation, validation-based selection,
atomic checkpoints with every RNG state, exact resume, progress bar and epoch log;
checks before training (labels, weights and outputs of both models) and a stop on divergence.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from robkd.data.core import ImageData
from robkd.distill import objectives as O
from robkd.distill.config import IGA_METHODS, TrainConfig
from robkd.errors import (DataError, IncompatibleModelsError, ModelRuntimeError, RobkdError, TrainingDivergedError,
                          UsageError)
from robkd.utils.io import atomic_path, atomic_write_text, remove_stale_temps
from robkd.utils.logits import correct, finite_rows

log = logging.getLogger(__name__)

STATE_FORMAT = "robkd-train-state"
STATE_VERSION = 1
# options that may change between a run and its resumption (a state saved on CUDA resumes on the CPU and back)
_RESUMABLE_CHANGES = {"checkpoint_every", "device"}


@dataclasses.dataclass
class TrainLog:
    """What a training run did: one record per epoch, the selected epoch, the resolved config."""

    records: list[dict[str, Any]]
    config: dict[str, Any]
    finished: bool
    selected_epoch: int | None = None
    global_step: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Strict-JSON dict (a non-finite number becomes ``None``)."""
        return finite_or_none(dataclasses.asdict(self))


# ----------------------------------------------------------------------------- device
def resolve_device(device: "str | torch.device | None") -> torch.device:
    """The device this process trains on; a device that is unknown or not available is a :class:`UsageError`.

    Uses :func:`robkd.distributed.context._resolve_device` (under ``torchrun`` a CUDA
    device becomes ``cuda:LOCAL_RANK``) and also checks that a ``cuda:N`` index and
    MPS exist, so that the error is one line before any data is loaded.
    """
    from robkd.distributed.context import _env_int, _resolve_device, env_world_size

    world = env_world_size()
    dev = _resolve_device(device, _env_int("LOCAL_RANK", 0) if world > 1 else 0, world)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"device {device!r} requested but MPS is not available (use --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported training device {device!r}: use cpu, cuda, cuda:N or mps")
    return dev


def _model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts/lists/tuples) with every tensor a detached CPU tensor."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------- finiteness and input checks
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


def _names(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_finite_weights(model: torch.nn.Module, role: str, advice: str) -> None:
    """A :class:`ModelRuntimeError` when ``model`` has a NaN/inf parameter or buffer."""
    bad = nonfinite_tensors(model)
    if bad:
        raise ModelRuntimeError(f"the {role} has non-finite weights (NaN/inf in {_names(bad)}): {advice}")


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
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x.to(_model_device(model)))
    except RobkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's model failed: one line, exit 2
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelRuntimeError(f"the {role} failed on a batch of {len(x)} training images ({type(exc).__name__}: {first})") from exc
    finally:
        model.train(was)
    if not isinstance(out, torch.Tensor):
        raise ModelRuntimeError(f"the {role} returned {type(out).__name__}, not a tensor of logits")
    if out.dim() != 2 or out.shape[0] != x.shape[0] or out.shape[1] < 1:
        raise ModelRuntimeError(f"the {role} returned outputs of shape {list(out.shape)} for a batch of {x.shape[0]} "
                                f"images: a classifier returns (batch, classes) logits")
    if not out.is_floating_point():
        raise ModelRuntimeError(f"the {role} returned {out.dtype} outputs: a classifier returns float logits")
    return out


def finite_or_none(obj: Any) -> Any:
    """``obj`` (nested dicts/lists) with every NaN/inf float replaced by ``None``, so that it is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- augmentation
def resolve_augment(augment: str, dataset: str | None) -> str:
    """``auto`` -> ``crop-flip`` for CIFAR (pad 4 + horizontal flip), ``none`` otherwise (Fashion-MNIST, MNIST)."""
    if augment != "auto":
        return augment
    return "crop-flip" if dataset and dataset.lower().startswith("cifar") else "none"


def augment_batch(x: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (4 px for inputs >= 32 px, else 2 px) and/or horizontal flip (p = 0.5).

    Draws from ``gen`` only, so the augmentation is reproducible and resumable.
    """
    if kind == "none":
        return x
    b, _, h, w = x.shape
    if "crop" in kind:
        p = 4 if min(h, w) >= 32 else 2
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=gen)
        rows = (oy[:, None] + torch.arange(h)[None, :])  # (B,H)
        cols = (ox[:, None] + torch.arange(w)[None, :])  # (B,W)
        bi = torch.arange(b)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
    if "flip" in kind:
        flip = torch.rand((b,), generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


# ----------------------------------------------------------------------------- evaluation
def evaluate_robust(model: torch.nn.Module, data: ImageData, *, norm: str, eps: float, steps: int, step_size: float,
                    seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """(clean accuracy, PGD-``steps`` robust accuracy) of ``model`` on ``data`` (eval mode, fixed seed).

    Runs on the model's device; the attack's random starts are drawn on the CPU. An output row with
    NaN/inf is never counted correct (:func:`robkd.utils.logits.correct`).
    """
    from robkd.attacks.pgd import projected_gradient_ascent

    was = model.training
    model.eval()
    dev = _model_device(model)
    gen = torch.Generator().manual_seed(int(seed))
    clean = robust = 0
    try:
        for x, y in data.batches(batch_size):
            x, y = x.to(dev), y.to(dev)
            with torch.no_grad():
                ok = correct(model(x), y)
            clean += int(ok.sum())
            if steps > 0 and eps > 0:
                x_adv = projected_gradient_ascent(
                    lambda z: torch.nn.functional.cross_entropy(model(z), y, reduction="none"),
                    x, norm=norm, eps=eps, steps=steps, step_size=step_size, random_start="uniform", generator=gen,
                )
                with torch.no_grad():
                    ok = ok & correct(model(x_adv), y)
            robust += int(ok.sum())
    finally:
        model.train(was)
    n = max(1, len(data))
    return clean / n, robust / n


# ----------------------------------------------------------------------------- RNG state
def _rng_state(data_gen: torch.Generator, attack_gen: torch.Generator, device: torch.device | None = None) -> dict[str, Any]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    extra = {"cuda": torch.cuda.get_rng_state(device)} if device is not None and device.type == "cuda" else {}
    return {**extra,
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": int(py_state[0]), "state": torch.tensor(py_state[1], dtype=torch.int64),
                   "gauss": py_state[2] if py_state[2] is not None else None},
        "data": data_gen.get_state(),
        "attack": attack_gen.get_state(),
    }


def _set_rng_state(s: dict[str, Any], data_gen: torch.Generator, attack_gen: torch.Generator,
                   device: torch.device | None = None) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = s["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    data_gen.set_state(s["data"])
    attack_gen.set_state(s["attack"])
    if device is not None and device.type == "cuda" and "cuda" in s:  # dropout masks on CUDA (absent in a CPU-saved state)
        torch.cuda.set_rng_state(s["cuda"], device)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Read a training-state file (``torch.load(weights_only=True)``) onto the CPU, wherever it was saved."""
    p = Path(path)
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read training state {p}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UsageError(f"{p} is not a robkd training-state file")
    if state.get("version") != STATE_VERSION:
        raise UsageError(f"{p} is training-state version {state.get('version')}, this robkd reads {STATE_VERSION}")
    return state


# ----------------------------------------------------------------------------- trainer
class Trainer:
    """Train ``student`` with ``config.method`` on ``train_data``, validating on ``val_data``.

    * SGD (momentum, weight decay) with a ``torch.optim.lr_scheduler`` schedule
      stepped once per pass: ``multistep`` (MultiStepLR at ``milestones``
      fractions of the run, factor ``lr_gamma``), ``cosine`` (CosineAnnealingLR)
      or ``constant``;
    * model selection on the validation robust accuracy (PGD-``val_steps`` at
      the training radius on ``val_n`` validation samples, never the test set),
      or the last epoch;
    * an atomic checkpoint (``state_path``) after every epoch and every
      ``checkpoint_every`` steps, holding model, optimizer, scheduler, every RNG
      state, the epoch's data order and position; :meth:`fit` with
      ``resume=True`` continues from it and, on CPU with the same seed, ends with
      the same weights as an uninterrupted run; it refuses other options, another
      teacher (weights SHA-256) or another dataset name; it also refuses a state
      holding NaN/inf weights, and deletes the temporary files a killed write of
      the state or the log left beside them (on a fresh start too);
    * before training (at construction): labels within the models' classes,
      finite weights of student and teacher, float ``(B, K)`` outputs of both
      on a first training batch with one class count, and finite teacher outputs
      (:class:`robkd.errors.ModelRuntimeError`, :class:`robkd.errors.DataError`...);
    * divergence: a NaN/inf loss (checked before its backward pass) or NaN/inf
      student weights (after every optimizer step) stop training with
      :class:`TrainingDivergedError` (or a ModelRuntimeError when the teacher's
      outputs are the cause); no non-finite state is ever saved, the last good
      training state stays on disk, and the epoch log stays strict JSON;
    * ``config.cache_teacher`` holds the effective value: whether the teacher
      cache is used (never for ``kdiga-arda``, whose teacher sees ``x_adv``);
    * the teacher is frozen: eval mode and ``requires_grad_(False)`` on its
      parameters (the passed module is modified in place);
    * under ``torchrun`` (``WORLD_SIZE`` > 1) the student trains in
      DistributedDataParallel: every rank draws the same global batches and
      augmentation, takes its contiguous part of each batch, and scales its loss
      so that the averaged gradient is the global batch mean's; the teacher is
      replicated (eval mode) on every rank; rank 0 alone writes checkpoints and
      logs; a checkpoint holds global state, so it resumes with any number of
      processes (see docs/distributed.md);
    * ``config.device`` is where student, teacher (both moved there in place),
      batches, training attacks, the teacher cache, validation and the Fast-ARD
      perturbation live (``cuda:LOCAL_RANK`` and nccl under ``torchrun``); the
      data order, augmentation and attack random starts are drawn on the CPU from
      the seeded generators, so the same seed gives the same batches on any
      device; checkpoints hold CPU copies, so a state saved on one device
      resumes on another.
    """

    def __init__(
        self,
        student: torch.nn.Module,
        config: TrainConfig,
        train_data: ImageData,
        val_data: ImageData | None = None,
        teacher: torch.nn.Module | None = None,
        *,
        dataset: str | None = None,
        default_eps: float | None = None,
        state_path: str | Path | None = None,
        log_path: str | Path | None = None,
        show_progress: bool = True,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise UsageError("config must be a TrainConfig")
        self.config = config.resolve(default_eps, dataset)
        c = self.config
        self.device = resolve_device(c.device)  # an unavailable device fails here, before any training
        if c.uses_teacher and teacher is None:
            raise UsageError(f"method {c.method} distils from a teacher: give one")
        if not c.uses_teacher and teacher is not None:
            raise UsageError(f"method {c.method} trains without a teacher; drop the teacher (distillation methods: kd, ard, fast-ard, kdiga, kdiga-ardc, kdiga-arda)")
        if len(train_data) == 0:
            raise DataError("the training set is empty")
        self._check_data(student, train_data, "student")
        if teacher is not None:
            self._check_data(teacher, train_data, "teacher")
        self._check_models(student, teacher, train_data, val_data, c.batch_size)
        self.student = student
        self.teacher = teacher
        self.train_data = train_data
        if val_data is not None and c.val_n > 0 and len(val_data) > 0:
            from robkd.data import eval_subset

            self.val_data = eval_subset(val_data, c.val_n, seed=c.seed)  # a fixed seeded subset of val_n samples
        else:
            self.val_data = None
        if c.select == "val-robust" and self.val_data is None:
            raise UsageError("--select val-robust needs a validation split")
        self.dataset = dataset
        self.augment = resolve_augment(c.augment, dataset)
        self.state_path = Path(state_path) if state_path else None
        self.log_path = Path(log_path) if log_path else None
        self.show_progress = show_progress
        if c.cache_teacher and self.augment != "none":
            raise UsageError("the teacher cache is valid only without augmentation: use --augment none or --no-cache-teacher")
        # teacher values on clean inputs are constant when the inputs are not augmented
        self.use_cache = (teacher is not None and self.augment == "none" and c.cache_teacher is not False
                          and c.method != "kdiga-arda")
        if c.cache_teacher and not self.use_cache:
            why = "kdiga-arda evaluates the teacher at x_adv" if c.method == "kdiga-arda" else "there is no teacher"
            log.warning("--cache-teacher has no effect here (%s): training without the teacher cache", why)
        # the config (and so the log and the provenance) records whether the cache is really used
        self.config = dataclasses.replace(c, cache_teacher=self.use_cache)
        self._identity: dict[str, Any] | None = None

    @staticmethod
    def _check_data(model: torch.nn.Module, data: ImageData, role: str) -> None:
        meta = getattr(model, "meta", None)
        if meta is None:
            return
        if meta.input_shape is not None and tuple(meta.input_shape) != tuple(data.input_shape):
            raise IncompatibleModelsError(f"the {role} takes inputs of shape {list(meta.input_shape)} but the data has {list(data.input_shape)}")

    @staticmethod
    def _check_models(student: torch.nn.Module, teacher: torch.nn.Module | None, train_data: ImageData,
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
                raise O.nonfinite_teacher(bad, len(x), "training images")
            if int(t_out.shape[1]) != k:
                raise IncompatibleModelsError(f"the teacher returns {int(t_out.shape[1])} classes but the student returns {k}")
        for d in datas:
            check_label_range(d, k, "the models'")

    # ------------------------------------------------------------------ setup
    def _build_optim(self, steps_total: int):
        c = self.config
        opt = torch.optim.SGD(self.student.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        if c.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps_total)
        elif c.schedule == "multistep":
            # duplicates are kept: on a short run two fractions can land on the same epoch, and
            # MultiStepLR then applies gamma once per milestone there instead of losing a decay
            ms = sorted(max(1, int(round(f * steps_total))) for f in c.milestones)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=ms, gamma=c.lr_gamma)
        else:
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[], gamma=1.0)
        return opt, sched

    def identity(self) -> dict[str, Any]:
        """What a resumed run must share with the saved one besides the options: teacher weights and dataset.

        ``teacher_sha256`` is the SHA-256 of the teacher's state_dict (names, shapes,
        dtypes, bytes; :func:`robkd.distill.model_sha256`), ``None`` without a teacher.
        """
        if self._identity is None:
            from robkd.distill.api import model_sha256

            self._identity = {"teacher_sha256": model_sha256(self.teacher) if self.teacher is not None else None,
                              "dataset": self.dataset}
        return self._identity

    def _freeze_teacher(self) -> None:
        if self.teacher is not None:
            self.teacher.eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ main loop
    def fit(self, *, resume: bool = False, max_steps: int | None = None) -> TrainLog:
        """Train; with ``resume`` continue from ``state_path`` when it exists.

        ``max_steps`` stops (after checkpointing) once this call has done that
        many batches: used to simulate a kill. Returns the :class:`TrainLog`
        (``finished`` False when stopped early).
        """
        c = self.config
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise UsageError(f"max_steps must be a positive integer, got {max_steps!r}")
        if max_steps is not None and self.state_path is None:
            raise UsageError("stopping early (max_steps) needs a state_path to checkpoint to")
        from robkd.distributed import ddp as D
        from robkd.distributed import init_from_env

        dctx = init_from_env(c.device)
        dev = self.device = dctx.device
        if dctx.distributed:
            if c.method == "fast-ard":
                raise UsageError("fast-ard carries its perturbation across batches in one process; "
                                 "train it without torchrun (DDP supports every other method)")
            if c.method in IGA_METHODS and c.iga_form == "reference":
                raise UsageError("--iga-form reference takes one norm over the whole batch, which does not split across "
                                 "processes: use --iga-form per-sample (the default) under torchrun")
            if c.batch_size < dctx.world_size:
                raise UsageError(f"--batch-size {c.batch_size} is smaller than the {dctx.world_size} processes")
        self._freeze_teacher()
        self.student.to(dev)
        if self.teacher is not None:
            self.teacher.to(dev)
        passes = c.passes
        n = len(self.train_data)
        nb = (n + c.batch_size - 1) // c.batch_size
        torch.manual_seed(c.seed)
        data_gen = torch.Generator().manual_seed(c.seed)
        attack_gen = torch.Generator().manual_seed(c.seed + 1)
        opt, sched = self._build_optim(passes)
        records: list[dict[str, Any]] = []
        epoch, step, global_step = 0, 0, 0
        perm: torch.Tensor | None = None
        sums: dict[str, float] = {}
        epoch_time = 0.0
        best: dict[str, Any] = {"epoch": None, "robust": -1.0, "clean": -1.0, "state": {}}
        delta: torch.Tensor | None = None
        saved: dict[str, Any] = {"at": None}  # (epoch, step) of the last training state written or resumed from

        if dctx.is_main:  # a kill during an atomic write leaves its temporary file beside the target
            for target in (self.state_path, self.log_path):
                if target is not None:
                    remove_stale_temps(target)
        if resume and self.state_path is not None and self.state_path.exists():
            st = load_train_state(self.state_path)  # global state: every rank reads the same file
            self._check_resume_identity(st)
            self._check_resume_config(st)
            bad = nonfinite_tensors(st["model"]) + nonfinite_tensors(st["best"]["state"] or {})
            if bad:
                raise UsageError(f"cannot resume from {self.state_path}: it holds non-finite weights ({_names(bad)}), "
                                 f"written by a run that diverged; start afresh without --resume (and a lower --lr)")
            self.student.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
            _set_rng_state(st["rng"], data_gen, attack_gen, dev)
            epoch, step, global_step = int(st["epoch"]), int(st["step"]), int(st["global_step"])
            perm = st["perm"] if st["perm"].numel() else None
            sums = json.loads(st["epoch_sums"]) if dctx.is_main else {}  # saved sums are global: count them once
            epoch_time = float(st.get("epoch_time", 0.0))
            records = json.loads(st["log"])
            best = {"epoch": st["best"]["epoch"], "robust": float(st["best"]["robust"]), "clean": float(st["best"]["clean"]), "state": st["best"]["state"]}
            delta = st["delta"].to(dev) if st["delta"].numel() else None
            saved["at"] = (epoch, step)
            log.info("resuming %s from epoch %d, step %d (%s)", c.method, epoch + 1, step, self.state_path)
            if st.get("finished"):
                self._finalise(best)
                return TrainLog(records, c.to_dict(), True, best["epoch"] if c.select == "val-robust" else len(records), global_step)
        elif resume:
            log.info("no training state at %s: starting from scratch", self.state_path)

        cache = None
        if self.use_cache and epoch < passes:
            cache = O.TeacherCache(self.teacher, self.train_data, grads=c.method in IGA_METHODS, device=dev)
        ctx = O.StepContext(D.wrap(self.student, dctx), self.teacher, c, attack_gen, cache)
        objective = None if c.method == "fast-ard" else O.get_objective(c.method)
        done_this_call = 0
        ident = self.identity() if self.state_path is not None else {}

        def diverged(what: str) -> TrainingDivergedError:
            """The error that ends a diverged run: where, what, what is kept, what to try."""
            if self.state_path is not None and saved["at"] is not None:
                e, s_ = saved["at"]
                at = f"after epoch {e}" if s_ == 0 else f"at epoch {e + 1}, step {s_}"
                kept = f"the last good training state ({at}) is kept in {self.state_path}"
            else:
                kept = "no training state was saved yet"
            return TrainingDivergedError(
                f"training diverged at epoch {epoch + 1}/{passes}, step {step + 1}/{nb}: {what}; no model was saved and "
                f"{kept}; lower the learning rate (--lr, {opt.param_groups[0]['lr']:g} at this step) and train again")

        def agreed(ok: bool) -> bool:
            """``ok`` on every rank (one collective under torchrun, so that all ranks stop together)."""
            return D.sum_across_ranks({"bad": 0.0 if ok else 1.0}, dctx)["bad"] == 0 if dctx.distributed else ok

        def check_loss(loss: torch.Tensor, x: torch.Tensor, cidx: torch.Tensor | None) -> None:
            """Before the backward pass: a NaN/inf loss stops training (blaming the teacher when its outputs are)."""
            if agreed(bool(torch.isfinite(loss.detach()).all())):
                return
            if self.teacher is not None:
                bad_t = int((~finite_rows(ctx.teacher_logits(x, cidx))).sum())
                if bad_t:
                    raise O.nonfinite_teacher(bad_t, len(x), f"images of epoch {epoch + 1}, step {step + 1}")
            raise diverged(f"the {c.method} loss is {float(loss.detach().float().sum())}")

        def check_weights() -> None:
            """After the optimizer step: NaN/inf student weights stop training before anything saves them."""
            bad = nonfinite_tensors(self.student)
            if not agreed(not bad):
                raise diverged(f"the student's weights became non-finite (NaN/inf in {_names(bad) or 'another process'})")

        def save(finished: bool = False) -> None:
            if self.state_path is None:
                return
            global_sums = D.sum_across_ranks(sums, dctx)  # collective: every rank calls save at the same step
            if not dctx.is_main:
                return
            state = {
                "format": STATE_FORMAT, "version": STATE_VERSION, "finished": finished,
                "config": json.dumps(c.to_dict(), sort_keys=True),
                "teacher_sha256": ident["teacher_sha256"], "dataset": ident["dataset"],
                "epoch": epoch, "step": step, "global_step": global_step,
                "model": _to_cpu(self.student.state_dict()),  # CPU copies: the state loads on any device
                "optimizer": _to_cpu(opt.state_dict()), "scheduler": sched.state_dict(),
                "rng": _rng_state(data_gen, attack_gen, dev),
                "perm": perm if perm is not None else torch.empty(0, dtype=torch.int64),
                "epoch_sums": json.dumps(global_sums), "epoch_time": epoch_time,
                "log": json.dumps(records),
                "best": {"epoch": best["epoch"], "robust": best["robust"], "clean": best["clean"], "state": best["state"]},
                "delta": _to_cpu(delta) if delta is not None else torch.empty(0),
            }
            with atomic_path(self.state_path) as tmp:
                torch.save(state, str(tmp))
            saved["at"] = (epoch, step)

        from robkd.utils.progress import progress_bar, rate_text

        with progress_bar(transient=True, rate_unit="img") as prog:
            while epoch < passes:
                if perm is None:
                    perm = torch.randperm(n, generator=data_gen)
                    step, sums, epoch_time = 0, {}, 0.0
                task = (prog.add_task(f"{c.method} epoch {epoch + 1}/{passes}", total=nb, completed=step, rate="")
                        if self.show_progress and dctx.is_main else None)
                self.student.train()
                t0 = time.perf_counter()
                imgs = 0
                while step < nb:
                    idx = perm[step * c.batch_size : (step + 1) * c.batch_size]
                    x = augment_batch(self.train_data.float_x(idx), self.augment, data_gen)  # drawn on the CPU
                    y = self.train_data.y[idx]
                    weight = len(idx)  # samples this process contributes to the epoch's averages
                    scale = 1.0
                    if dctx.distributed:  # this rank's contiguous part of the global batch
                        a, b = D.local_part(idx, dctx)
                        weight, scale = b - a, D.loss_scale(b - a, len(idx), dctx)
                        if b == a:  # a short last batch left nothing here: one sample with zero weight keeps DDP in step
                            a, b = 0, 1
                        ctx.batch_part = (a, b, len(idx))
                        x, y, idx = x[a:b], y[a:b], idx[a:b]
                    x, y = x.to(dev), y.to(dev)
                    cidx = idx if cache is not None else None
                    if c.method == "fast-ard":
                        delta, terms = self._fast_ard_batch(ctx, opt, x, y, cidx, delta, check_loss, check_weights)
                    else:
                        loss, terms = objective(ctx, x, y, cidx)
                        check_loss(loss, x, cidx)
                        if dctx.distributed:
                            loss = loss * scale
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                        check_weights()
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + v * weight
                    sums["_n"] = sums.get("_n", 0.0) + weight
                    step += 1
                    global_step += 1
                    done_this_call += 1
                    imgs += len(idx)
                    if task is not None:
                        el = time.perf_counter() - t0
                        desc = " ".join(f"{k}={v:.3f}" for k, v in terms.items())
                        prog.update(task, advance=1, description=f"{c.method} {epoch + 1}/{passes} {desc} lr={opt.param_groups[0]['lr']:.3g}",
                                    rate=rate_text(imgs, el, "img"))
                    stop = max_steps is not None and done_this_call >= max_steps
                    if step < nb and ((c.checkpoint_every and global_step % c.checkpoint_every == 0) or stop):
                        epoch_time += time.perf_counter() - t0
                        t0 = time.perf_counter()
                        imgs = 0
                        save()
                        if stop:
                            return TrainLog(records, c.to_dict(), False, best["epoch"], global_step)
                epoch_time += time.perf_counter() - t0
                if task is not None:
                    prog.remove_task(task)
                # ---- end of pass: schedule, validation, selection, log, checkpoint
                D.average_buffers(self.student, dctx)  # BatchNorm statistics: one model on every rank
                lr_used = opt.param_groups[0]["lr"]
                sched.step()
                sums = D.sum_across_ranks(sums, dctx)  # global averages over every rank's samples
                rec: dict[str, Any] = {"epoch": epoch + 1, "lr": lr_used, "steps": global_step}
                cnt = max(1.0, sums.get("_n", 1.0))
                rec.update({k: v / cnt for k, v in sums.items() if k != "_n"})
                rec["loss"] = sum(v for k, v in rec.items() if k not in ("epoch", "lr", "steps"))
                rec["train_seconds"] = round(epoch_time, 3)
                rec["images_per_s"] = round(n * (c.replays if c.method == "fast-ard" else 1) / max(epoch_time, 1e-9), 1)
                if self.val_data is not None:
                    vc, vr = evaluate_robust(self.student, self.val_data, norm=c.norm, eps=c.eps, steps=c.val_steps,
                                             step_size=c.eps / 4.0, seed=c.seed + 12345)
                    rec["val_clean"], rec["val_robust"] = vc, vr
                    if c.select == "val-robust" and (vr, vc) > (best["robust"], best["clean"]):
                        best = {"epoch": epoch + 1, "robust": vr, "clean": vc,
                                "state": _to_cpu(self.student.state_dict())}
                records.append(rec)
                log.info("%s epoch %d/%d: %s", c.method, epoch + 1, passes,
                         ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if k != "epoch"))
                epoch += 1
                step = 0
                perm = None
                sums = {}
                epoch_time = 0.0
                self._write_log(records)
                save(finished=epoch >= passes)
                if max_steps is not None and done_this_call >= max_steps and epoch < passes:
                    return TrainLog(records, c.to_dict(), False, best["epoch"], global_step)
        self._finalise(best)
        self._write_log(records)
        from robkd.distributed import barrier

        barrier(dctx)  # the final checkpoint and log exist before any rank goes on
        return TrainLog(records, c.to_dict(), True, best["epoch"] if c.select == "val-robust" else len(records), global_step)

    def _fast_ard_batch(self, ctx, opt, x, y, cidx, delta, check_loss=None, check_weights=None):
        """m replays of one minibatch, the perturbation carried across replays and batches.

        ``check_loss(loss, x, cidx)`` runs before each backward pass and ``check_weights()`` after each step."""
        c = self.config
        b = x.shape[0]
        if delta is None or delta.shape[1:] != x.shape[1:] or delta.shape[0] < b:
            full = torch.zeros((max(b, c.batch_size),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
            if delta is not None and delta.shape[1:] == x.shape[1:]:
                full[: delta.shape[0]] = delta[: full.shape[0]].to(x.device)
            delta = full
        delta = delta.to(x.device)
        d = delta[:b]
        agg: dict[str, float] = {}
        t_logits = ctx.teacher_logits(x, cidx)  # clean x: the same in every replay
        for _ in range(c.replays):
            loss, terms, x_in = O.fast_ard_replay(ctx, x, y, cidx, d, t_logits)
            if check_loss is not None:
                check_loss(loss, x, cidx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            d = O.fast_ard_update_delta(ctx, x, x_in)
            opt.step()
            if check_weights is not None:
                check_weights()
            for k, v in terms.items():
                agg[k] = agg.get(k, 0.0) + v / c.replays
        delta = delta.clone()
        delta[:b] = d
        return delta, agg

    def _finalise(self, best: dict[str, Any]) -> None:
        if self.config.select == "val-robust" and best.get("state"):
            self.student.load_state_dict(best["state"])
        self.student.eval()

    def _write_log(self, records: list[dict[str, Any]]) -> None:
        from robkd.distributed import current

        if self.log_path is None or not current().is_main:
            return
        atomic_write_text(self.log_path, "".join(json.dumps(finite_or_none(r), sort_keys=True, allow_nan=False) + "\n"
                                                 for r in records))

    def _check_resume_identity(self, st: dict[str, Any]) -> None:
        """Refuse to resume a run of another teacher or dataset (UsageError naming both)."""
        if "teacher_sha256" not in st or "dataset" not in st:
            log.warning("%s predates teacher/dataset checks: resuming without checking them", self.state_path)
            return
        saved = {"teacher_sha256": st["teacher_sha256"], "dataset": st["dataset"]}
        now = self.identity()
        if saved != now:
            def desc(d: dict[str, Any]) -> str:
                return f"teacher sha256 {d['teacher_sha256'] or 'none'} and dataset {d['dataset']!r}"

            raise UsageError(f"cannot resume from {self.state_path}: it was started with {desc(saved)}, this run has "
                             f"{desc(now)}; use the same teacher and data or a new --state file")

    def _check_resume_config(self, st: dict[str, Any]) -> None:
        saved = json.loads(st["config"])
        now = self.config.to_dict()
        diff = sorted(k for k in set(saved) | set(now) if k not in _RESUMABLE_CHANGES and saved.get(k) != now.get(k))
        if diff:
            detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {now.get(k)!r}" for k in diff[:6])
            raise UsageError(f"cannot resume from {self.state_path}: the options differ ({detail}); use the same options or a new --state file")


def copy_model(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy (used to keep the caller's model untouched)."""
    return copy.deepcopy(model)
