"""Flags shared by several commands (model loading, data selection, radii, output)."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_args(p: argparse.ArgumentParser, *, pair: bool = True) -> None:
    """Flags that complete what a model file does not say about itself."""
    g = p.add_argument_group("model loading")
    g.add_argument("--arch", help="architecture for state_dict files: robkd:<name>, timm:<name> or module.path:Factory")
    if pair:
        g.add_argument("--teacher-arch", help="architecture of the teacher only (overrides --arch)")
        g.add_argument("--student-arch", help="architecture of the student only (overrides --arch)")
    g.add_argument("--mean", help="per-channel mean applied inside the model, e.g. 0.4914,0.4822,0.4465")
    g.add_argument("--std", help="per-channel std applied inside the model")
    g.add_argument("--num-classes", type=int, help="number of classes (state_dict files)")
    g.add_argument("--input-shape", help="input shape C,H,W (default: from the checkpoint or dataset)")
    g.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow loading fully pickled nn.Module files (runs code from the file: only for files you trust)",
    )


def add_data_args(p: argparse.ArgumentParser, *, default_n: int | None = 1000, default_split: str = "test",
                  default_seed: int = 0) -> None:
    """Dataset, subset size and seed; the ``default_*`` values are the command's own defaults, shown in the
    help (the flags themselves default to None: "not given")."""
    g = p.add_argument_group("data")
    g.add_argument("--data", help="dataset name (fashion-mnist, mnist, cifar10, cifar100, imagefolder, fashion-mnist-slice) or a .npz/.pt file")
    g.add_argument("--data-dir", help="directory holding the dataset files")
    g.add_argument("--split", default=None, help=f"split to evaluate on (default: {default_split})")
    g.add_argument("--n", "-n", "--num-samples", dest="n", type=int, default=None,
                   help=f"number of samples, a seeded random subset (default: {default_n}); "
                        "under torchrun write -n or --num-samples (torchrun mistakes --n for its own --nnodes)")
    g.add_argument("--seed", type=int, default=None, help=f"seed for the subset and the attacks (default: {default_seed})")
    g.add_argument("--img-size", type=int, help="resize ImageFolder images to this size")
    g.add_argument("--download", action="store_true", help="download the dataset through torchvision if missing")


def add_run_control_args(g: "argparse._ActionsContainer", *, what: str, checkpoint: str) -> None:
    """``--dry-run`` and ``--time-limit`` of a long command (``what``: its name; ``checkpoint``: when it saves
    its resumable state, where a time limit stops it)."""
    g.add_argument("--dry-run", action="store_true",
                   help=f"check everything (models, data, gates, --out) and print the {what}'s plan with a cost "
                        "estimate (passes per model, attack and radius, sanity checks, certification; the time from "
                        "a few timed forward+backward passes); exits 0 without attacking or writing anything")
    g.add_argument("--time-limit", metavar="DURATION",
                   help=f"stop the whole {what} cleanly once DURATION has passed (90m, 2h, 3600s, 1h30m, or 45 = "
                        f"seconds) at the next check point ({checkpoint}): needs --out, keeps the finished work there "
                        "and exits 2; continue with the same command plus --resume")


def add_device_arg(g: "argparse._ActionsContainer", *, what: str = "computes") -> None:
    """``--device`` (cpu default; cuda, cuda:N, mps); under torchrun CUDA means one GPU per process."""
    g.add_argument("--device", default="cpu",
                   help=f"where the run {what}: cpu (default), cuda, cuda:N or mps; under torchrun --device cuda "
                        "uses cuda:LOCAL_RANK and the nccl backend")


def model_kwargs(args: argparse.Namespace, role: str | None = None) -> dict[str, Any]:
    """Keyword arguments for :func:`robkd.models.load_model` from parsed flags."""
    from robkd.utils.validate import parse_floats, parse_shape

    arch = getattr(args, f"{role}_arch", None) if role else None
    mean, std, shape = (getattr(args, k, None) for k in ("mean", "std", "input_shape"))
    return dict(
        arch=arch or getattr(args, "arch", None),
        mean=None if mean is None else tuple(parse_floats(mean, "mean (--mean)")),
        std=None if std is None else tuple(parse_floats(std, "std (--std)")),
        num_classes=getattr(args, "num_classes", None),
        input_shape=None if shape is None else parse_shape(shape),
        allow_pickle=bool(getattr(args, "allow_pickle", False)),
    )
