"""``robkd env``: versions, threads, devices and data locations, ready to paste into a bug report."""

from __future__ import annotations

import argparse


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("env", help="print versions, threads, devices and data locations (for bug reports)",
                       description="Print versions, threads, devices and data locations found, for bug reports.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def collect() -> dict[str, object]:
    """The environment facts as a dict (also stored in every results.json)."""
    import importlib.metadata as md
    import os
    import platform
    import sys

    info: dict[str, object] = {
        "robkd": _version("robkd", md),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    for pkg in ("torch", "torchvision", "timm", "pyautoattack", "safetensors", "scipy", "numpy", "pandas", "rich", "matplotlib"):
        info[pkg] = _version(pkg, md)
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


def _version(pkg: str, md) -> str:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return "not installed"


def run(args: argparse.Namespace) -> int:
    import json

    info = collect()
    if args.json:
        import sys

        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="robkd environment", show_header=False)
    for k, v in info.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                table.add_row(f"data: {kk}", str(vv) if vv else "not found")
        else:
            table.add_row(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
    Console().print(table)
    return 0
