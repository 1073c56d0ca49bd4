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
from robkd.models.registry import create_model, split_arch
from robkd.models.wrapper import RobustModel
from robkd.types import ModelMeta, short_repr as _clip
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
            meta, _ = _safetensors_header(p)
            return "robkd" if "robkd" in meta else "safetensors"
    if head[:1] == b"\x80" or head[:2] == b"\x8a\x0a":  # legacy (non-zip) torch.save pickle
        return "torch"
    raise ModelLoadError(
        f"unknown model format: {p} (expected a robkd/safetensors checkpoint, TorchScript, torch.export .pt2, or torch.save file)"
    )


_Spec = tuple[tuple[int, ...], str]
"""A stored tensor as ``(shape, kind)``; kind is ``float``, ``int``, ``bool``, ``complex`` or ``other``."""


def _safetensors_header(path: Path) -> tuple[dict[str, str], dict[str, _Spec]]:
    """``(metadata, {name: (shape, kind)})`` of a safetensors file, read without loading any tensor.

    The one place a safetensors header is parsed: the safetensors library validates it (JSON depth,
    ``__metadata__`` a mapping of strings, dtypes, shapes and offsets against the file size), and
    anything it refuses is one :class:`ModelLoadError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            table = {}
            for name in fh.keys():
                sl = fh.get_slice(name)
                table[name] = (tuple(int(v) for v in sl.get_shape()), _safetensors_kind(sl.get_dtype()))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ... on a hostile header
        raise ModelLoadError(f"corrupt safetensors header in {path}: {_first_line(exc)}") from exc
    return dict(meta), table


def _safetensors_kind(dtype: str) -> str:
    d = str(dtype).upper()
    if d == "BOOL":
        return "bool"
    if d.startswith(("F", "BF")):
        return "float"
    if d.startswith(("I", "U")):
        return "int"
    return "complex" if d.startswith("C") else "other"


def _tensor_kind(t: torch.Tensor) -> str:
    if t.dtype == torch.bool:
        return "bool"
    if t.dtype.is_floating_point:
        return "float"
    return "complex" if t.dtype.is_complex else "int"


def _specs(state: Mapping[str, torch.Tensor]) -> dict[str, _Spec]:
    return {k: (tuple(int(v) for v in t.shape), _tensor_kind(t)) for k, t in state.items()}


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (its type name when empty), shortened."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
        input_shape=tuple(input_shape) if input_shape is not None else None,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
    )
    flags.validate()  # UsageError naming the bad value (bounds in robkd.types)
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
    if meta.input_shape is not None:
        _check_outputs(model)
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
        return tuple(info.input_shape), (int(info.num_classes) or None)
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
    """Number of logits from one forward pass on two zero images; :class:`ModelLoadError` unless the
    model returns floating-point ``(2, classes)`` logits."""
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=_first_device(model)))
    except Exception as exc:  # user models fail in many ways
        raise ModelLoadError(f"model does not accept inputs of shape {list(input_shape)}: {_first_line(exc)}") from exc
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(f"model output for a batch of 2 images has shape {got}; expected (batch, classes) logits")
    if not out.dtype.is_floating_point:
        raise ModelLoadError(f"model returns {out.dtype} outputs; expected floating-point logits")
    return int(out.shape[1])


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


def _first_device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def _is_user_arch(arch: str | None) -> bool:
    """Whether ``arch`` names user code (``module.path:Factory``) rather than robkd's or timm's registry."""
    return bool(arch) and str(arch).split(":", 1)[0] not in ("robkd", "timm")


MAX_ELEMENTS = 2**32
"""Most parameter and buffer values of a model robkd builds from an architecture name (16 GiB as float32)."""
MAX_TENSORS = 20_000
"""Most parameter and buffer tensors of such a model (the largest timm models have a few thousand)."""
MAX_MODULES = 50_000
"""Most submodule registrations while building such a model."""


class _TooLarge(ModelLoadError):
    """An architecture's arguments ask for more than :data:`MAX_ELEMENTS` values, :data:`MAX_TENSORS` tensors
    or :data:`MAX_MODULES` modules."""


def _size(n: int) -> str:
    """``n`` values and their float32 size, e.g. ``1.1e+12 values (4.4 TB as float32)``."""
    nbytes, unit = 4.0 * n, "B"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB", "EB"):
        if nbytes < 1000 or unit == "EB":
            break
        nbytes /= 1000
    return f"{n:.3g} values ({nbytes:.3g} {unit} as float32)"


@contextlib.contextmanager
def _size_guard(what: str, *, values: bool = True):
    """Count the parameters, buffers and submodules registered while building ``what``; past
    :data:`MAX_TENSORS` or :data:`MAX_MODULES` (and :data:`MAX_ELEMENTS` values, with ``values``) raise
    :class:`_TooLarge` at once (a layer's tensor is registered before it is initialised, so nothing that
    large is ever touched). On the ``meta`` device values cost nothing: count them all, then report the size."""
    from torch.nn.modules import module as mod

    seen = {"values": 0, "tensors": 0, "modules": 0}
    limits = {"values": MAX_ELEMENTS if values else float("inf"), "tensors": MAX_TENSORS, "modules": MAX_MODULES}

    def count(key: str, n: int) -> None:
        seen[key] += n
        if seen[key] > limits[key]:
            amount = _size(limits[key]) if key == "values" else f"{limits[key]:,} {key}"
            raise _TooLarge(f"{what} would hold more than {amount}, the most robkd builds: the "
                            f"architecture's arguments are absurd or the file's metadata is corrupt")

    def on_tensor(module: nn.Module, name: str, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            count("tensors", 1)
            count("values", int(t.numel()))

    def on_module(module: nn.Module, name: str, sub: Any) -> None:
        count("modules", 1)

    handles = [mod.register_module_parameter_registration_hook(on_tensor),
               mod.register_module_buffer_registration_hook(on_tensor),
               mod.register_module_module_registration_hook(on_module)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _build_arch(meta: ModelMeta, weights: Mapping[str, _Spec] | None = None, source: str = "the file") -> nn.Module:
    """Build ``meta.arch`` (random weights). Its size is checked before anything is allocated: the
    architecture is first built on the ``meta`` device, refused past :data:`MAX_ELEMENTS`, and compared
    with ``weights`` (the file's tensor names, shapes and kinds) when given. User code
    (``module.path:Factory``) or a timm model that cannot run on the meta device is built directly,
    under a guard that stops at the first tensor past the limits."""
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
    kwargs: dict[str, Any] = dict(num_classes=meta.num_classes or 10, in_chans=c, img_size=h)
    clash = sorted(set(kwargs) & set(meta.arch_kwargs))
    if clash:
        raise ModelLoadError(f"arch_kwargs of {meta.arch} must not set {clash}: they come from the model's metadata")
    kwargs.update(meta.arch_kwargs)
    what = f"{meta.arch} with arguments {_clip(dict(meta.arch_kwargs))}"
    try:
        with torch.device("meta"), _size_guard(what, values=False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Initializing zero-element tensors is a no-op"
            skeleton = _create(meta.arch, kwargs, what)
    except _TooLarge:
        raise
    except RobkdError as exc:
        if split_arch(meta.arch)[0] == "robkd":  # robkd's own architectures all build on the meta device
            raise
        # timm or user code that cannot run on the meta device (e.g. it reads a tensor's values): build it
        # for real, under the size guard
        log.debug("building %s on the meta device failed (%s); building it directly", meta.arch, exc)
        with _size_guard(what):
            return _create(meta.arch, kwargs, what)
    state = skeleton.state_dict()
    total = sum(int(t.numel()) for t in skeleton.parameters()) + sum(int(t.numel()) for t in skeleton.buffers())
    if total > MAX_ELEMENTS:
        raise _TooLarge(f"{what} would hold {_size(total)}; robkd builds at most {_size(MAX_ELEMENTS)}: the "
                        f"architecture's arguments are absurd or the file's metadata is corrupt")
    empty = [name for name, t in skeleton.named_parameters() if t.numel() == 0]
    if empty:
        raise ModelLoadError(f"{what} has parameters with no values ({_short(empty, 3)}): the architecture's "
                             f"arguments are wrong")
    if weights is not None:
        _match_weights(_specs(state), weights, source)
    return _create(meta.arch, kwargs, what)


def _create(arch: str, kwargs: dict[str, Any], what: str) -> nn.Module:
    try:
        return create_model(arch, **kwargs)
    except RobkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - arguments the factory rejects (bad type, negative width, ...)
        raise ModelLoadError(f"cannot build {what}: {type(exc).__name__}: {_first_line(exc)}") from exc


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
    meta = ModelMeta(
        arch=arch,
        arch_kwargs=dict(arch_kwargs or {}),
        num_classes=num_classes,
        input_shape=tuple(input_shape),
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        dataset=dataset,
    ).validate()
    model = RobustModel(_build_arch(meta), meta)
    return model.eval()


def load_state_dict_strict(net: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with one clear error listing every mismatch (names, shapes, and
    kinds: a float parameter never takes integer or boolean values)."""
    _match_weights(_specs(net.state_dict()), _specs(state), source)
    try:
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - what the comparison above cannot foresee (user modules' hooks)
        raise ModelLoadError(f"weights in {source} do not load: {_first_line(exc)}") from exc


def _match_weights(own: Mapping[str, _Spec], given: Mapping[str, _Spec], source: str) -> None:
    """:class:`ModelLoadError` listing every missing, unexpected, mis-shaped or mis-typed tensor."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    common = sorted(set(own) & set(given))
    shape = [f"{k}: file {given[k][0]} vs model {own[k][0]}" for k in common if given[k][0] != own[k][0]]
    kind = [f"{k}: file {given[k][1]} vs model {own[k][1]}" for k in common if given[k][1] != own[k][1]]
    if missing or unexpected or shape or kind:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if shape:
            parts.append(f"shape mismatches {_short(shape)}")
        if kind:
            parts.append(f"dtype mismatches {_short(kind)}")
        raise ModelLoadError(f"weights in {source} do not match the architecture: " + "; ".join(parts))


def _short(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(i if len(i) <= 100 else i[:97] + "..." for i in items[:limit])
    return f"[{shown}{', ... (%d more)' % (len(items) - limit) if len(items) > limit else ''}]"


def _unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """Find a state_dict in common containers (``{"state_dict": ...}`` and the like, at most 8 levels
    deep); strip a DDP ``module.`` prefix."""
    stack = [(obj, 0)]  # depth first, in the order of _STATE_DICT_KEYS, without recursion
    while stack:
        obj, depth = stack.pop()
        if not isinstance(obj, Mapping):
            continue
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            state = dict(obj)
            if all(k.startswith("module.") for k in state):
                state = {k[len("module."):]: v for k, v in state.items()}
            return state
        if depth < 8:
            stack.extend((obj[k], depth + 1) for k in reversed(_STATE_DICT_KEYS) if k in obj)
    return None


def _robkd_meta(p: Path) -> ModelMeta:
    return _robkd_meta_from(_safetensors_header(p)[0], p)


def _robkd_meta_from(raw: Mapping[str, str], p: Path) -> ModelMeta:
    """The :class:`ModelMeta` in a robkd checkpoint's ``robkd`` metadata entry (a JSON string), every
    field checked (:meth:`ModelMeta.validate`); :class:`ModelLoadError` for anything malformed."""
    try:
        info = json.loads(raw["robkd"])
    except (KeyError, ValueError, TypeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else _first_line(exc)
        raise ModelLoadError(f"corrupt robkd metadata in {p}: not a JSON object ({reason})") from exc
    if not isinstance(info, dict) or not isinstance(info.get("meta"), dict):
        raise ModelLoadError(f"corrupt robkd metadata in {p}: want an object with 'format_version' and 'meta'")
    if str(info.get("format_version"))[:20] != ROBKD_FORMAT_VERSION:
        raise ModelLoadError(f"{p} is robkd checkpoint format {str(info.get('format_version'))[:20]!r}, "
                             f"this robkd reads {ROBKD_FORMAT_VERSION}")
    try:
        return ModelMeta.from_dict(info["meta"])
    except RobkdError as exc:
        raise ModelLoadError(f"corrupt robkd metadata in {p}: {exc}") from exc


def checkpoint_meta(path: str | Path) -> ModelMeta | None:
    """The metadata a robkd checkpoint carries (architecture, shape, classes, normalisation...), read
    without building the model; ``None`` for files of other formats."""
    p = Path(path)
    return _robkd_meta(p) if detect_format(p) == "robkd" else None


def _load_safetensors_tensors(p: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(p))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise ModelLoadError(f"corrupt safetensors data in {p}: {_first_line(exc)}") from exc


def _load_robkd(p: Path, flags: ModelMeta, allow_pickle: bool):
    raw, table = _safetensors_header(p)
    meta = _robkd_meta_from(raw, p)
    if flags.arch and flags.arch != meta.arch:
        raise UsageError(f"{p} is a robkd checkpoint of {meta.arch}; --arch {flags.arch} contradicts it (drop --arch)")
    if _is_user_arch(meta.arch) and flags.arch != meta.arch and not allow_pickle:
        # the file names code to import and call: never run it on the file's word alone
        raise UsageError(f"{p} names the architecture {meta.arch!r}, which imports and calls code outside robkd and "
                         f"timm; if you trust that code, confirm it with --arch {meta.arch} (or --allow-pickle)")
    net = _build_arch(meta, table, str(p))
    load_state_dict_strict(net, _load_safetensors_tensors(p), str(p))
    return net, meta


def _load_safetensors(p: Path, flags: ModelMeta, allow_pickle: bool):
    _, table = _safetensors_header(p)
    if table and all(k.startswith("module.") for k in table):  # as _unwrap_state_dict does
        table = {k[len("module."):]: v for k, v in table.items()}
    meta = ModelMeta(**{k: v for k, v in vars(flags).items() if k not in ("provenance", "source")})
    net = _build_arch(meta, table, str(p))
    state = _load_safetensors_tensors(p)
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
    net = _build_arch(meta, _specs(state), str(p))
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
