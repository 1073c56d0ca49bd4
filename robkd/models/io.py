"""Loading every supported model format and saving robkd checkpoints.

Formats are detected from the file's bytes, never from its extension:

* robkd checkpoint: safetensors whose header metadata has a ``robkd`` entry
  (architecture, kwargs, classes, input shape, mean/std, dataset, provenance);
* plain safetensors state_dict (needs ``arch``);
* TorchScript archive (``torch.jit.save``);
* ``torch.export`` program (``.pt2`` archive);
* ``torch.save`` state_dict (loaded with ``weights_only=True``; needs ``arch``);
* a pickled ``nn.Module`` (only with ``allow_pickle=True``: pickle runs code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import struct
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from robkd.errors import IncompatibleModelsError, ModelLoadError, RobkdError, UsageError
from robkd.models.registry import create_model
from robkd.models.wrapper import RobustModel
from robkd.types import ModelMeta
from robkd.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

ROBKD_FORMAT_VERSION = "1"
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


# ----------------------------------------------------------------------------- detection
def detect_format(path: str | Path) -> str:
    """Return one of ``robkd``, ``safetensors``, ``torchscript``, ``export``, ``torch``.

    ``torch`` covers every ``torch.save`` file (state_dict or pickled module).
    Raises :class:`ModelLoadError` for missing, empty or unrecognised files.
    """
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p}")
    if p.is_dir():
        raise ModelLoadError(f"model path is a directory, not a file: {p}")
    with open(p, "rb") as fh:
        head = fh.read(16)
    if not head:
        raise ModelLoadError(f"model file is empty: {p}")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as exc:
            raise ModelLoadError(f"model file is a corrupt zip archive: {p} ({exc})") from exc
        stems = {n.split("/", 1)[1] if "/" in n else n for n in names}
        if any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json") for n in names) or "archive_format" in stems:
            return "export"
        if any(s.startswith("code/") for s in stems) and "constants.pkl" in stems:
            return "torchscript"
        if "data.pkl" in stems:
            return "torch"
        raise ModelLoadError(f"unknown model format (zip archive that is neither torch.save, TorchScript nor torch.export): {p}")
    if len(head) >= 9:
        # safetensors first: its little-endian header length may start with byte 0x80
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            meta = _read_safetensors_metadata(p)
            return "robkd" if "robkd" in meta else "safetensors"
    if head[:1] == b"\x80" or head[:2] == b"\x8a\x0a":  # legacy (non-zip) torch.save pickle
        return "torch"
    raise ModelLoadError(
        f"unknown model format: {p} (expected a robkd/safetensors checkpoint, TorchScript, torch.export .pt2, or torch.save file)"
    )


def _read_safetensors_metadata(path: Path) -> dict[str, str]:
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as exc:
        raise ModelLoadError(f"corrupt safetensors header in {path}: {exc}") from exc
    return header.get("__metadata__", {}) or {}


# ----------------------------------------------------------------------------- loading
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

    ``arch`` (``robkd:<name>``, ``timm:<name>`` or ``module.path:Factory``) is
    needed for plain state_dicts; ``mean``/``std``/``num_classes``/``input_shape``
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
        input_shape=tuple(int(v) for v in input_shape) if input_shape else None,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )
    if flags.input_shape is not None and len(flags.input_shape) != 3:
        raise UsageError(f"input shape must be C,H,W, got {list(flags.input_shape)}")
    loader = _LOADERS[fmt]
    if fmt in ("safetensors", "torch"):  # weights only: the data may say what the architecture needs
        shape, classes = _data_hints(dataset)
        hinted = dataclasses.replace(flags, input_shape=flags.input_shape or shape, num_classes=flags.num_classes or classes)
        net, meta = loader(p, hinted, allow_pickle)
    else:
        net, meta = loader(p, flags, allow_pickle)
    meta.source = {"path": str(p), "format": fmt}
    _apply_overrides(meta, flags)
    model = RobustModel(net, meta)
    model.to(device)
    model.eval()
    if meta.num_classes is None and meta.input_shape is not None:
        meta.num_classes = infer_num_classes(model, meta.input_shape)
    return model


def _data_hints(dataset: Any) -> tuple[tuple[int, int, int] | None, int | None]:
    """``(input_shape, num_classes)`` of a dataset name or loaded data (``(None, None)`` when unknown)."""
    if dataset is None:
        return None, None
    if isinstance(dataset, str):
        from robkd.data import dataset_info

        info = dataset_info(dataset)
        if info is None:
            raise UsageError(f"unknown dataset {dataset!r} for the model's input shape: pass input_shape=(C, H, W)")
        return tuple(info.input_shape), int(info.num_classes)
    shape, classes = getattr(dataset, "input_shape", None), getattr(dataset, "num_classes", None)
    if shape is None:
        raise UsageError(f"dataset must be a dataset name or robkd ImageData, got {type(dataset).__name__}")
    return tuple(int(v) for v in shape), (int(classes) if classes else None)


def _apply_overrides(meta: ModelMeta, flags: ModelMeta) -> None:
    """Fill in metadata the file does not carry from the flags; a flag that contradicts the file's own
    value is an error (in an audit the flags apply to both models, so an override would silently
    re-normalise a checkpoint that knows its own normalisation)."""
    for name in ("num_classes", "input_shape", "mean", "std"):
        value = getattr(flags, name)
        if value is None:
            continue
        own = getattr(meta, name)
        if own is not None and not _same(own, value):
            raise UsageError(f"the model file says {name} = {_show(own)}, the flags say {_show(value)}: drop the flag "
                             f"for this model (its file already carries the value)")
        setattr(meta, name, value)
    if meta.mean is not None and meta.std is not None and len(meta.mean) != len(meta.std):
        raise UsageError(f"mean has {len(meta.mean)} values but std has {len(meta.std)}")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(abs(float(u) - float(v)) <= 1e-6 * max(1.0, abs(float(u))) for u, v in zip(a, b))
    return a == b


def _show(v: Any) -> str:
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)


def infer_num_classes(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Number of logits from one forward pass on a zero image."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *input_shape, device=_first_device(model)))
    except Exception as exc:  # user models fail in many ways
        raise ModelLoadError(f"model does not accept inputs of shape {list(input_shape)}: {exc}") from exc
    if out.dim() != 2:
        raise ModelLoadError(f"model output has shape {list(out.shape)}; expected (batch, classes) logits")
    return int(out.shape[1])


def _first_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _is_user_arch(arch: str | None) -> bool:
    """Whether ``arch`` names user code (``module.path:Factory``) rather than robkd's or timm's registry."""
    return bool(arch) and str(arch).split(":", 1)[0] not in ("robkd", "timm")


def _build_arch(meta: ModelMeta) -> nn.Module:
    if not meta.arch:
        raise ModelLoadError(
            "this file holds only weights (a state_dict): name the architecture with --arch "
            "(robkd:<name>, timm:<name> or module.path:Factory)"
        )
    if meta.input_shape is None:
        raise ModelLoadError(f"architecture {meta.arch} needs the input shape: pass --input-shape C,H,W or a dataset")
    if len(meta.input_shape) != 3 or not isinstance(meta.arch_kwargs, Mapping):
        raise ModelLoadError(f"bad architecture metadata: input shape {list(meta.input_shape)} (want C,H,W), "
                             f"arch_kwargs {meta.arch_kwargs!r} (want a mapping)")
    c, h, _ = meta.input_shape
    try:
        return create_model(meta.arch, num_classes=meta.num_classes or 10, in_chans=c, img_size=h, **meta.arch_kwargs)
    except (TypeError, ValueError) as exc:  # arch_kwargs the factory does not take
        raise ModelLoadError(f"cannot build {meta.arch} with arguments {dict(meta.arch_kwargs)!r}: {exc}") from exc


def build_model(
    arch: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dataset: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
) -> RobustModel:
    """Create a fresh (randomly initialised) :class:`RobustModel` from an architecture name."""
    if len(tuple(input_shape)) != 3:
        raise UsageError(f"input shape must be C,H,W, got {list(input_shape)}")
    meta = ModelMeta(
        arch=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        num_classes=int(num_classes),
        input_shape=tuple(int(v) for v in input_shape),
        mean=tuple(float(v) for v in mean) if mean is not None else None,
        std=tuple(float(v) for v in std) if std is not None else None,
        dataset=dataset,
    )
    model = RobustModel(_build_arch(meta), meta)
    return model.eval()


def load_state_dict_strict(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one clear error listing every mismatch."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if shape:
            parts.append(f"shape mismatches {_short(shape)}")
        raise ModelLoadError(f"weights in {source} do not match the architecture: " + "; ".join(parts))
    net.load_state_dict(state, strict=True)


def _short(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{', ... (%d more)' % (len(items) - limit) if len(items) > limit else ''}]"


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """Find a state_dict in common containers; strip a DDP ``module.`` prefix."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            state = dict(obj)
            if all(k.startswith("module.") for k in state):
                state = {k[len("module."):]: v for k, v in state.items()}
            return state
        for key in _STATE_DICT_KEYS:
            if key in obj:
                found = _unwrap_state_dict(obj[key])
                if found is not None:
                    return found
    return None


def _robkd_meta(p: Path) -> ModelMeta:
    raw = _read_safetensors_metadata(p)
    try:
        info = json.loads(raw["robkd"])
        meta = ModelMeta.from_dict(info["meta"])
    except (KeyError, ValueError, TypeError, RobkdError) as exc:
        raise ModelLoadError(f"corrupt robkd metadata in {p}: {exc}") from exc
    if str(info.get("format_version")) != ROBKD_FORMAT_VERSION:
        raise ModelLoadError(f"{p} is robkd checkpoint format {info.get('format_version')}, this robkd reads {ROBKD_FORMAT_VERSION}")
    return meta


def checkpoint_meta(path: str | Path) -> ModelMeta | None:
    """The metadata a robkd checkpoint carries (architecture, shape, classes, normalisation...), read
    without building the model; ``None`` for files of other formats."""
    p = Path(path)
    return _robkd_meta(p) if detect_format(p) == "robkd" else None


def _load_robkd(p: Path, flags: ModelMeta, allow_pickle: bool):
    from safetensors.torch import load_file

    meta = _robkd_meta(p)
    if flags.arch and flags.arch != meta.arch:
        raise UsageError(f"{p} is a robkd checkpoint of {meta.arch}; --arch {flags.arch} contradicts it (drop --arch)")
    if _is_user_arch(meta.arch) and flags.arch != meta.arch and not allow_pickle:
        # the file names code to import and call: never run it on the file's word alone
        raise UsageError(f"{p} names the architecture {meta.arch!r}, which imports and calls code outside robkd and "
                         f"timm; if you trust that code, confirm it with --arch {meta.arch} (or --allow-pickle)")
    net = _build_arch(meta)
    try:
        state = load_file(str(p))
    except Exception as exc:
        raise ModelLoadError(f"corrupt safetensors data in {p}: {exc}") from exc
    load_state_dict_strict(net, state, str(p))
    return net, meta


def _load_safetensors(p: Path, flags: ModelMeta, allow_pickle: bool):
    from safetensors.torch import load_file

    try:
        state = load_file(str(p))
    except Exception as exc:
        raise ModelLoadError(f"corrupt safetensors file {p}: {exc}") from exc
    meta = ModelMeta(**{k: v for k, v in vars(flags).items() if k not in ("provenance", "source")})
    net = _build_arch(meta)
    load_state_dict_strict(net, _unwrap_state_dict(state) or state, str(p))
    return net, meta


def _load_torchscript(p: Path, flags: ModelMeta, allow_pickle: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        try:
            net = torch.jit.load(str(p), map_location="cpu")
        except Exception as exc:
            raise ModelLoadError(f"corrupt TorchScript file {p}: {exc}") from exc
    return net, ModelMeta(arch="torchscript")


@contextlib.contextmanager
def _weights_only_torch_load():
    """Force ``weights_only=True`` on every ``torch.load`` made inside (``torch.export.load`` unpickles a
    program's sample inputs, and pickled weights or constants, with ``weights_only=False``: a crafted
    ``.pt2`` would otherwise run code). Not thread-safe: it swaps ``torch.load`` for the duration."""
    real = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = real


def _load_export(p: Path, flags: ModelMeta, allow_pickle: bool):
    guard = contextlib.nullcontext() if allow_pickle else _weights_only_torch_load()
    try:
        with guard:
            program = torch.export.load(str(p))
            net = program.module()
    except Exception as exc:
        text = str(exc).lower()
        if not allow_pickle and ("weights_only" in text or "unpickl" in text):
            raise ModelLoadError(f"{p} holds pickled Python objects beyond tensors (sample inputs, weights or "
                                 f"constants); unpickling runs code from the file: pass --allow-pickle only if you "
                                 f"trust it") from exc
        raise ModelLoadError(f"corrupt torch.export program {p}: {exc}") from exc
    meta = ModelMeta(arch="torch.export")
    fixed_batch = None
    try:
        arg = program.example_inputs[0][0] if program.example_inputs else None
        if isinstance(arg, torch.Tensor) and arg.dim() == 4:
            meta.input_shape = tuple(int(v) for v in arg.shape[1:])
            fixed_batch = _fixed_batch(net, arg)
    except (AttributeError, IndexError, TypeError):
        pass
    return _ExportedModule(net, fixed_batch), meta


def _fixed_batch(net: nn.Module, example: torch.Tensor) -> int | None:
    """The example's batch size when the program accepts no other (exported without a dynamic batch)."""
    b = int(example.shape[0])
    other = example[:1] if b > 1 else torch.cat([example, example])
    try:
        with torch.no_grad():
            net(other)
    except Exception:  # noqa: BLE001 - a shape guard of the exported graph
        return b
    return None


class _ExportedModule(nn.Module):
    """Holds an exported program's module; eval()/train() must not reach into it.

    ``fixed_batch``: the only batch size the program accepts (``torch.export`` fixes the batch size
    unless it was exported with a dynamic batch dimension); other batches then run in chunks of that
    size, the last one padded by repeating its final row (padding rows are dropped from the output, and
    an exported graph computes each row independently, so the kept rows are unchanged)."""

    def __init__(self, gm: nn.Module, fixed_batch: int | None = None) -> None:
        super().__init__()
        self.gm = gm
        self.fixed_batch = fixed_batch

    def train(self, mode: bool = True) -> "_ExportedModule":  # exported graphs have no mode
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fb = self.fixed_batch
        if fb is None or x.shape[0] == fb:
            return self.gm(x)
        outs = []
        for s in range(0, x.shape[0], fb):
            part = x[s : s + fb]
            n = part.shape[0]
            if n < fb:
                part = torch.cat([part, part[-1:].expand(fb - n, *part.shape[1:])])
            outs.append(self.gm(part)[:n])
        return torch.cat(outs)


def _load_torch(p: Path, flags: ModelMeta, allow_pickle: bool):
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        msg = str(exc)
        unsafe = "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg
        if not unsafe:
            first = next((line.strip() for line in msg.splitlines() if line.strip()), type(exc).__name__)
            raise ModelLoadError(f"corrupt torch.save file {p}: {first}") from exc
        if not allow_pickle:
            raise ModelLoadError(
                f"{p} is a pickled Python object (e.g. a whole nn.Module), and unpickling runs arbitrary code: "
                "re-save it as a state_dict, or pass --allow-pickle only if you trust the file"
            ) from None
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=False)
        except Exception as exc2:
            raise ModelLoadError(f"cannot unpickle {p}: {exc2}") from exc2
    if isinstance(obj, nn.Module):
        return obj, ModelMeta(arch=f"pickle:{type(obj).__module__}.{type(obj).__qualname__}")
    state = _unwrap_state_dict(obj)
    if state is None:
        raise ModelLoadError(f"{p} holds a {type(obj).__name__}, neither a state_dict nor an nn.Module")
    meta = ModelMeta(**{k: v for k, v in vars(flags).items() if k not in ("provenance", "source")})
    net = _build_arch(meta)
    load_state_dict_strict(net, state, str(p))
    return net, meta


_LOADERS = {
    "robkd": _load_robkd,
    "safetensors": _load_safetensors,
    "torchscript": _load_torchscript,
    "export": _load_export,
    "torch": _load_torch,
}


# ----------------------------------------------------------------------------- saving
def save_model(model: RobustModel, path: str | Path, *, provenance: Mapping[str, Any] | None = None) -> Path:
    """Write a self-describing robkd checkpoint (safetensors + JSON metadata), atomically.

    The model must come from a registered architecture (``meta.arch`` is
    ``robkd:``/``timm:``/``module:Factory``) so that it can be rebuilt.
    """
    from safetensors.torch import save

    if not isinstance(model, RobustModel):
        raise UsageError("save_model expects a RobustModel (wrap it with robkd.models.RobustModel(net, meta))")
    meta = model.meta
    if not meta.arch or meta.arch in ("torchscript", "torch.export") or meta.arch.startswith("pickle:"):
        raise UsageError(f"cannot save a model of architecture {meta.arch!r} as a robkd checkpoint: it cannot be rebuilt by name")
    if meta.input_shape is None or meta.num_classes is None:
        raise UsageError("save_model needs meta.input_shape and meta.num_classes")
    if provenance:
        meta.provenance = {**meta.provenance, **dict(provenance)}
    meta_dict = meta.to_dict()
    meta_dict["source"] = {}
    if meta_dict["mean"] is None:
        meta_dict["mean"] = model.normalize.mean.flatten().tolist()
        meta_dict["std"] = model.normalize.std.flatten().tolist()
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.net.state_dict().items()}
    header = {"robkd": json.dumps({"format_version": ROBKD_FORMAT_VERSION, "meta": meta_dict}, sort_keys=True)}
    data = save(state, metadata=header)
    atomic_write_bytes(path, data)
    return Path(path)


def check_compatible(teacher: RobustModel, student: RobustModel) -> None:
    """Raise :class:`IncompatibleModelsError` unless classes and input shapes agree."""
    t, s = teacher.meta, student.meta
    if t.num_classes is not None and s.num_classes is not None and t.num_classes != s.num_classes:
        raise IncompatibleModelsError(f"teacher has {t.num_classes} classes but student has {s.num_classes}")
    if t.input_shape is not None and s.input_shape is not None and tuple(t.input_shape) != tuple(s.input_shape):
        raise IncompatibleModelsError(
            f"teacher takes inputs of shape {list(t.input_shape)} but student takes {list(s.input_shape)}"
        )
