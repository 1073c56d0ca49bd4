"""safetensors files: robkd checkpoints (weights plus a ``robkd`` metadata entry that says how to rebuild
the model) and plain safetensors state_dicts (the architecture comes from the flags)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from robkd.errors import UsageError
from robkd.models.build import build_arch
from robkd.models.formats.detect import detect_format
from robkd.models.metadata import meta_from_flags, parse_robkd_meta
from robkd.models.safetensors_header import read_header, read_tensors
from robkd.models.weights import load_state_dict_strict, strip_ddp_prefix, unwrap_state_dict
from robkd.types import ModelMeta


def checkpoint_meta(path: str | Path) -> ModelMeta | None:
    """The metadata a robkd checkpoint carries (architecture, shape, classes, normalisation...), read
    without building the model; ``None`` for files of other formats."""
    p = Path(path)
    return parse_robkd_meta(read_header(p)[0], p) if detect_format(p) == "robkd" else None


def load_robkd(p: Path, flags: ModelMeta, allow_pickle: bool) -> tuple[nn.Module, ModelMeta]:
    """A robkd checkpoint: the architecture its metadata names (user code only when confirmed), strictly loaded."""
    raw, table = read_header(p)
    meta = parse_robkd_meta(raw, p)
    if flags.arch and flags.arch != meta.arch:
        raise UsageError(f"{p} is a robkd checkpoint of {meta.arch}; --arch {flags.arch} contradicts it (drop --arch)")
    if _is_user_arch(meta.arch) and flags.arch != meta.arch and not allow_pickle:
        # the file names code to import and call: never run it on the file's word alone
        raise UsageError(f"{p} names the architecture {meta.arch!r}, which imports and calls code outside robkd and "
                         f"timm; if you trust that code, confirm it with --arch {meta.arch} (or --allow-pickle)")
    net = build_arch(meta, table, str(p))
    load_state_dict_strict(net, read_tensors(p), str(p))
    return net, meta


def load_safetensors(p: Path, flags: ModelMeta, allow_pickle: bool) -> tuple[nn.Module, ModelMeta]:
    """A plain safetensors state_dict, loaded into the architecture the flags name."""
    _, table = read_header(p)
    meta = meta_from_flags(flags)
    net = build_arch(meta, strip_ddp_prefix(table), str(p))
    state = read_tensors(p)
    load_state_dict_strict(net, unwrap_state_dict(state) or state, str(p))
    return net, meta


def _is_user_arch(arch: str | None) -> bool:
    """Whether ``arch`` names user code (``module.path:Factory``) rather than robkd's or timm's registry."""
    return bool(arch) and str(arch).split(":", 1)[0] not in ("robkd", "timm")
