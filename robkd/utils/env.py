"""The environment record: versions, threads, devices and data locations (``robkd env`` and every results.json)."""

from __future__ import annotations

import functools
import importlib.metadata as md
import os
import platform
import sys

#: packages whose versions the record lists
PACKAGES = ("torch", "torchvision", "timm", "pyautoattack", "safetensors", "scipy", "numpy", "pandas", "rich", "matplotlib")


def collect() -> dict[str, object]:
    """The environment facts as a dict (also stored in every results.json)."""
    info: dict[str, object] = {
        "robkd": package_version("robkd"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for pkg in PACKAGES:
        info[pkg] = package_version(pkg)
    try:
        import auto_LiRPA  # noqa: F401

        info["auto_LiRPA"] = getattr(auto_LiRPA, "__version__", "importable")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        info["auto_LiRPA"] = f"not usable ({type(exc).__name__})"
    import torch

    info["torch_threads"] = torch.get_num_threads()
    info["torch_interop_threads"] = torch.get_num_interop_threads()
    info["cuda_available"] = torch.cuda.is_available()
    info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else ["cpu"]
    info["mps_available"] = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    from robkd.data import find_data_locations

    info["data"] = find_data_locations()
    return info


@functools.lru_cache(maxsize=None)
def package_version(pkg: str) -> str:
    """The installed version of ``pkg``, or ``"not installed"`` (read once per process: a metadata scan)."""
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"
