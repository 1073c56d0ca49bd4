"""Detecting a model file's format from its bytes, never from its extension."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

from robkd.errors import ModelLoadError
from robkd.models.safetensors_header import read_header


def detect_format(path: str | Path) -> str:
    """Return one of ``robkd``, ``safetensors``, ``torchscript``, ``export``, ``onnx``, ``torch``.

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
        return _zip_format(p)
    if len(head) >= 9:
        # safetensors first: its little-endian header length may start with byte 0x80
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            meta, _ = read_header(p)
            return "robkd" if "robkd" in meta else "safetensors"
    if head[:1] == b"\x80" or head[:2] == b"\x8a\x0a":  # legacy (non-zip) torch.save pickle
        return "torch"
    if head[:1] == b"\x08":  # protobuf field 1 (ir_version): an ONNX ModelProto
        from robkd.models.formats.onnx_file import INSTALL_HINT, looks_like_onnx, onnx_available

        if not onnx_available():
            raise ModelLoadError(f"{p} looks like an ONNX model; {INSTALL_HINT}")
        if looks_like_onnx(p):
            return "onnx"
    raise ModelLoadError(
        f"unknown model format: {p} (expected a robkd/safetensors checkpoint, TorchScript, torch.export .pt2, ONNX, or torch.save file)"
    )


def _zip_format(p: Path) -> str:
    """``export``, ``torchscript`` or ``torch`` for a zip archive, told apart by the names it holds."""
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
