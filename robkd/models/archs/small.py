"""Small fully-connected and convolutional nets for 28x28 and 32x32 inputs.

All are ReLU networks without max-pooling, so every bound method (IBP, CROWN,
MILP) supports them.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from robkd.errors import ArchitectureError
from robkd.models.registry import check_arg, register_model


def _check_size(img_size: int, name: str) -> None:
    if not isinstance(img_size, int) or img_size < 8:
        raise ArchitectureError(f"{name}: img_size must be an int >= 8, got {img_size!r}")


MAX_HIDDEN_LAYERS = 64


@register_model("mlp", input_sizes=(28, 32), description="Fully connected ReLU net (hidden sizes configurable)")
def mlp(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, hidden: Sequence[int] = (100, 100)) -> nn.Module:
    """Flatten -> [Linear -> ReLU]* -> Linear."""
    _check_size(img_size, "mlp")
    if not isinstance(hidden, (list, tuple)) or len(hidden) > MAX_HIDDEN_LAYERS:
        raise ArchitectureError(f"mlp: hidden must be a list of at most {MAX_HIDDEN_LAYERS} layer widths, "
                                f"got {type(hidden).__name__} of length {len(hidden) if hasattr(hidden, '__len__') else '?'}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_chans * img_size * img_size
    for h in hidden:
        h = check_arg("mlp", "each hidden width", h, 1, 2**20)
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@register_model("cnn_small", input_sizes=(28, 32), description="2 conv + 2 fc ReLU CNN (Wong & Kolter 'small')")
def cnn_small(num_classes: int = 10, in_chans: int = 1, img_size: int = 28, width: int = 1) -> nn.Module:
    """Conv(16,4,s2) -> Conv(32,4,s2) -> FC(100) -> FC(classes), ReLU after each hidden layer."""
    _check_size(img_size, "cnn_small")
    width = check_arg("cnn_small", "width", width, 1, 1024)
    c1, c2 = 16 * width, 32 * width
    s1 = (img_size + 2 - 4) // 2 + 1
    s2 = (s1 + 2 - 4) // 2 + 1
    return nn.Sequential(
        nn.Conv2d(in_chans, c1, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * s2 * s2, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


@register_model("cnn_medium", input_sizes=(28, 32), description="4 conv + 3 fc ReLU CNN with BatchNorm")
def cnn_medium(num_classes: int = 10, in_chans: int = 1, img_size: int = 28) -> nn.Module:
    """Conv32-Conv32(s2)-Conv64-Conv64(s2)-FC512-FC512-FC(classes), BatchNorm after each conv."""
    _check_size(img_size, "cnn_medium")

    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    s = (img_size - 1) // 2 + 1
    s = (s - 1) // 2 + 1
    return nn.Sequential(
        *block(in_chans, 32, 1),
        *block(32, 32, 2),
        *block(32, 64, 1),
        *block(64, 64, 2),
        nn.Flatten(),
        nn.Linear(64 * s * s, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )
