"""WideResNet (Zagoruyko & Komodakis) in the TRADES/Madry CIFAR form; WRN-34-10 by default."""

from __future__ import annotations

from torch import nn
import torch.nn.functional as F

from robkd.errors import ArchitectureError
from robkd.models.registry import check_arg, register_model


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, drop: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(drop)
        self.equal = cin == cout and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        short = x if self.shortcut is None else self.shortcut(o)
        out = self.conv1(o)
        out = self.conv2(self.drop(F.relu(self.bn2(out))))
        return out + short


class WideResNet(nn.Module):
    def __init__(self, depth: int = 34, widen: int = 10, num_classes: int = 10, in_chans: int = 3, drop: float = 0.0) -> None:
        super().__init__()
        depth = check_arg("WideResNet", "depth", depth, 10, 1000)
        widen = check_arg("WideResNet", "widen", widen, 1, 64)
        drop = check_arg("WideResNet", "drop", drop, 0.0, 0.99, integer=False)
        if (depth - 4) % 6:
            raise ArchitectureError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        blocks = []
        cin = widths[0]
        for i, stride in enumerate((1, 2, 2)):
            for j in range(n):
                blocks.append(WideBlock(cin, widths[i + 1], stride if j == 0 else 1, drop))
                cin = widths[i + 1]
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(cin)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.fc(self.flatten(self.pool(out)))


@register_model("wrn34_10", input_sizes=(32,), description="WideResNet-34-10 (TRADES / Madry CIFAR teacher)")
def wrn34_10(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """WRN-34-10, 46M parameters."""
    return WideResNet(34, 10, num_classes, in_chans)


@register_model("wrn", input_sizes=(28, 32), description="WideResNet with configurable depth/widen")
def wrn(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, depth: int = 16, widen: int = 4, drop: float = 0.0) -> nn.Module:
    """WRN-depth-widen (e.g. depth=16, widen=4 for quick experiments)."""
    return WideResNet(depth, widen, num_classes, in_chans, drop)
