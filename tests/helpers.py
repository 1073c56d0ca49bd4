"""Helpers shared by several test modules: tiny models and a plain training loop.

Test modules import these (``from helpers import ...``; pytest puts ``tests/`` on ``sys.path``) instead of
importing each other or ``conftest``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

# robkd is imported inside the helpers: conftest imports this module, and a broken robkd module should fail
# only the tests that use it
if TYPE_CHECKING:
    from robkd.models import RobustModel
    from robkd.types import Norm


# ----------------------------------------------------------------------------- gradient masking
class Quantised(nn.Module):
    """``inner`` behind a non-differentiable input quantiser to ``levels`` grey levels: ``torch.round`` has a
    zero gradient almost everywhere, so gradient attacks see nothing (masking), while on images of that grid
    the model is ``inner`` itself (``levels=255``: the 8-bit grid)."""

    def __init__(self, inner: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.inner = inner
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * self.levels) / self.levels)


# ----------------------------------------------------------------------------- training
def train_plain(model, data, epochs: int, seed: int, lr: float = 0.05):
    """A minimal seeded SGD loop (standard training) for test fixtures."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=g)
        for s in range(0, len(data), 64):
            idx = perm[s : s + 64]
            x, y = data.float_x(idx), data.y[idx]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def mlp(seed: int, hidden=(32,)):
    """A seeded Fashion-MNIST ``robkd:mlp`` (784-hidden-10) with the dataset's normalisation."""
    from robkd.models import build_model

    torch.manual_seed(seed)
    return build_model("robkd:mlp", input_shape=(1, 28, 28), num_classes=10, mean=(0.286,), std=(0.353,),
                       arch_kwargs={"hidden": list(hidden)})


# ----------------------------------------------------------------------------- tiny random networks (bounds)
class ResNetTiny(nn.Module):
    """conv -> relu -> residual block (F.relu / torch.relu, add) -> global avg pool -> view -> linear."""

    def __init__(self, c: int = 2) -> None:
        super().__init__()
        self.stem = nn.Conv2d(c, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = torch.relu(self.bn(self.conv(h)) + h)
        h = self.pool(h)
        return self.fc(h.view(h.size(0), -1))


def randomise_bn(net: nn.Module, g: torch.Generator) -> None:
    """Random BatchNorm statistics and affine parameters (drawn from ``g``), so BatchNorm is not the identity."""
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)


def make_net(kind: str, seed: int) -> RobustModel:
    """A small random network of the given kind wrapped with a non-trivial Normalize."""
    from robkd.models import RobustModel
    from robkd.types import ModelMeta

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))
    elif kind == "cnn":
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=1, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.ReLU(), nn.Dropout(0.5),
            nn.AvgPool2d(2), nn.Flatten(), nn.Linear(6 * 2 * 2, 3),
        )
    elif kind == "resnet":
        net = ResNetTiny()
    else:  # pragma: no cover
        raise ValueError(kind)
    randomise_bn(net, g)
    meta = ModelMeta(input_shape=(2, 8, 8), num_classes=3, mean=(0.4, 0.6), std=(0.25, 0.5))
    return RobustModel(net, meta).eval()


def random_points(x, eps, norm: Norm, n: int, seed: int) -> torch.Tensor:
    """n random points in the ball & [0,1] per sample (Linf: half of them box corners)."""
    from robkd.types import Norm

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if norm is Norm.LINF:
            u = torch.rand(x.shape, generator=g) * 2 - 1
            if i % 2:
                u = u.sign()
            d = u * eps
        else:
            d = torch.randn(x.shape, generator=g)
            r = torch.rand(x.shape[0], generator=g).view(-1, *[1] * (x.dim() - 1))
            d = d / d.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1)) * eps * r
        out.append((x + d).clamp(0, 1))
    return torch.stack(out)
