"""The training state: the loop's position and history (:class:`LoopState`), the file that holds it together
with the model, optimizer, scheduler and every RNG state (:class:`Checkpointer`), and the checks before a run
resumes from such a file."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from robkd.distill.checks import finite_or_none, nonfinite_tensors, short_list
from robkd.distill.rng import rng_state, set_rng_state
from robkd.errors import UsageError
from robkd.utils.io import atomic_path

log = logging.getLogger(__name__)

STATE_FORMAT = "robkd-train-state"
#: 2: ``teacher_sha256`` is :func:`robkd.models.identity.model_sha256` (version 1 hashed the state_dict otherwise)
STATE_VERSION = 2
#: options that may change between a run and its resumption (a state saved on CUDA resumes on the CPU and back)
RESUMABLE_CHANGES = frozenset({"checkpoint_every", "device"})


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


def to_cpu(obj: Any) -> Any:
    """A copy of ``obj`` (nested dicts/lists/tuples) with every tensor a detached CPU tensor."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


@dataclasses.dataclass
class Best:
    """The epoch selected so far (best validation robust, then clean accuracy) and a CPU copy of its weights."""

    epoch: int | None = None
    robust: float = -1.0
    clean: float = -1.0
    state: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    def to_state(self) -> dict[str, Any]:
        """The checkpoint entry (a plain dict, readable with ``weights_only=True``)."""
        return {"epoch": self.epoch, "robust": self.robust, "clean": self.clean, "state": self.state}

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> "Best":
        """Inverse of :meth:`to_state`."""
        return cls(d["epoch"], float(d["robust"]), float(d["clean"]), d["state"])


def _tensor_or_none(v: torch.Tensor | None) -> torch.Tensor:
    return to_cpu(v) if v is not None else torch.empty(0)


# how each kind of LoopState field is written to and read from the checkpoint
_ENCODE: dict[str, Callable[[Any], Any]] = {"int": int, "float": float, "json": json.dumps, "tensor": _tensor_or_none,
                                            "best": Best.to_state}
_DECODE: dict[str, Callable[[Any], Any]] = {"int": int, "float": float, "json": json.loads,
                                            "tensor": lambda t: t if t.numel() else None, "best": Best.from_state}


def _field(kind: str, **kw: Any) -> Any:
    return dataclasses.field(metadata={"kind": kind}, **kw)


@dataclasses.dataclass
class LoopState:
    """Where the training loop is and what it has done: what a checkpoint holds besides the model, optimizer,
    scheduler and RNG states. Its fields are the checkpoint's keys (:data:`LOOP_KEYS`)."""

    epoch: int = _field("int", default=0)  #: passes over the data completed
    step: int = _field("int", default=0)  #: batches done in the current pass
    global_step: int = _field("int", default=0)
    perm: torch.Tensor | None = _field("tensor", default=None)  #: the current pass's data order
    sums: dict[str, float] = _field("json", default_factory=dict)  #: loss-term sums of the pass (``_n``: samples)
    epoch_time: float = _field("float", default=0.0)  #: training seconds of the current pass
    records: list[dict[str, Any]] = _field("json", default_factory=list)  #: one record per pass done
    best: Best = _field("best", default_factory=Best)
    delta: torch.Tensor | None = _field("tensor", default=None)  #: Fast-ARD's perturbation, carried across batches

    def start_pass(self, perm: torch.Tensor) -> None:
        """Begin a pass over the data in the order ``perm``."""
        self.perm, self.step, self.sums, self.epoch_time = perm, 0, {}, 0.0

    def add_step(self, terms: Mapping[str, float], weight: float) -> None:
        """Count one batch: its loss terms weighted by the ``weight`` samples this process contributed."""
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * weight
        self.sums["_n"] = self.sums.get("_n", 0.0) + weight
        self.step += 1
        self.global_step += 1

    def end_pass(self, record: dict[str, Any]) -> None:
        """Close the pass with its log record."""
        self.records.append(record)
        self.epoch += 1
        self.step, self.perm, self.sums, self.epoch_time = 0, None, {}, 0.0

    def to_state(self, **override: Any) -> dict[str, Any]:
        """The checkpoint entries (CPU tensor copies, an empty tensor for ``None``, JSON text for dicts and lists);
        ``override`` replaces field values (the global sums under torchrun)."""
        return {f.name: _ENCODE[f.metadata["kind"]](override.get(f.name, getattr(self, f.name)))
                for f in dataclasses.fields(self)}

    @classmethod
    def from_state(cls, st: Mapping[str, Any]) -> "LoopState":
        """Inverse of :meth:`to_state` (tensors stay on the CPU)."""
        return cls(**{f.name: _DECODE[f.metadata["kind"]](st[f.name]) for f in dataclasses.fields(cls)})


#: the checkpoint keys of the loop state
LOOP_KEYS = tuple(f.name for f in dataclasses.fields(LoopState))


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
        raise UsageError(f"{p} is training-state version {state.get('version')}, this robkd reads {STATE_VERSION}: "
                         f"start afresh without --resume or give a new --state file")
    missing = [k for k in LOOP_KEYS if k not in state]
    if missing:
        raise UsageError(f"{p} is an incomplete training-state file (no {', '.join(missing)})")
    return state


def _option_defaults() -> dict[str, Any]:
    """The training options' defaults that need no resolving (``TrainConfig``'s plain field defaults)."""
    from robkd.distill.config import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)
            if f.default is not dataclasses.MISSING and f.default is not None}


def check_resumable(st: Mapping[str, Any], path: Path, *, config: Mapping[str, Any], identity: Mapping[str, Any]) -> None:
    """Refuse (:class:`UsageError`) to resume from ``st`` with other options, another teacher or dataset
    (``identity``), or when it holds non-finite weights."""
    saved_id = {k: st.get(k) for k in identity}
    if saved_id != dict(identity):
        def desc(d: Mapping[str, Any]) -> str:
            return f"teacher sha256 {d.get('teacher_sha256') or 'none'} and dataset {d.get('dataset')!r}"

        raise UsageError(f"cannot resume from {path}: it was started with {desc(saved_id)}, this run has "
                         f"{desc(identity)}; use the same teacher and data or a new --state file")
    saved = json.loads(st["config"])
    # an option added after the state was written counts as saved at its default (such a state is resumable)
    defaults = _option_defaults()
    saved = {**{k: v for k, v in defaults.items() if k in config and k not in saved}, **saved}
    diff = sorted(k for k in set(saved) | set(config) if k not in RESUMABLE_CHANGES and saved.get(k) != config.get(k))
    if diff:
        detail = ", ".join(f"{k}: saved {saved.get(k)!r} vs now {config.get(k)!r}" for k in diff[:6])
        raise UsageError(f"cannot resume from {path}: the options differ ({detail}); use the same options or a new --state file")
    bad = nonfinite_tensors(st["model"]) + nonfinite_tensors(st["best"]["state"] or {})
    if bad:
        raise UsageError(f"cannot resume from {path}: it holds non-finite weights ({short_list(bad)}), "
                         f"written by a run that diverged; start afresh without --resume (and a lower --lr)")


class Checkpointer:
    """Writes and restores the training state of one run at ``path`` (nothing without a path): a header (format,
    version, finished, the options as JSON, the run's ``identity``), CPU copies of the model, optimizer and
    scheduler, every RNG state and the :class:`LoopState`. Under torchrun rank 0 writes the global state."""

    def __init__(self, path: Path | None, *, config: Mapping[str, Any], identity: Mapping[str, Any],
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 data_gen: torch.Generator, attack_gen: torch.Generator, device: torch.device, dctx: Any) -> None:
        self.path, self.config, self.identity = path, dict(config), dict(identity)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.data_gen, self.attack_gen, self.device, self.dctx = data_gen, attack_gen, device, dctx
        #: (epoch, step) of the last state written or resumed from
        self.saved_at: tuple[int, int] | None = None

    def save(self, loop: LoopState, finished: bool = False) -> None:
        """Write the state atomically (every rank calls it at the same step: the loss sums are summed across ranks)."""
        if self.path is None:
            return
        from robkd.distributed import ddp as D

        global_sums = D.sum_across_ranks(loop.sums, self.dctx)  # collective
        if not self.dctx.is_main:
            return
        state = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "finished": finished,
            "config": json.dumps(self.config, sort_keys=True), **self.identity,
            "model": to_cpu(self.model.state_dict()),  # CPU copies: the state loads on any device
            "optimizer": to_cpu(self.optimizer.state_dict()), "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.data_gen, self.attack_gen, self.device),
            **loop.to_state(sums=global_sums),
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, str(tmp))
        self.saved_at = (loop.epoch, loop.step)

    def restore(self, st: Mapping[str, Any]) -> LoopState:
        """Load the model, optimizer, scheduler and RNG states of ``st`` (checked by :func:`check_resumable`);
        returns its loop state."""
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"], self.data_gen, self.attack_gen, self.device)
        loop = LoopState.from_state(st)
        if loop.delta is not None:
            loop.delta = loop.delta.to(self.device)
        if not self.dctx.is_main:
            loop.sums = {}  # the saved sums are global: counted once, on rank 0
        self.saved_at = (loop.epoch, loop.step)
        return loop
