"""MobileNetV2 for 32x32 inputs (stride-1 stem and first stages, as in the KDIGA CIFAR student)."""

from __future__ import annotations

from torch import nn
import torch.nn.functional as F

from robkd.models.registry import check_arg, register_model


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        hidden = expansion * cin
        self.conv1 = nn.Conv2d(cin, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = nn.Conv2d(hidden, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride == 1 and cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return out


# (expansion, out_planes, num_blocks, stride); stride 1 in stage 2 for CIFAR
_CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        width_mult = check_arg("MobileNetV2", "width_mult", width_mult, 0.01, 16.0, integer=False)
        c = lambda v: max(8, int(round(v * width_mult)))  # noqa: E731
        self.conv1 = nn.Conv2d(in_chans, c(32), 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c(32))
        layers = []
        cin = c(32)
        for expansion, out, n, stride in _CFG:
            for s in [stride] + [1] * (n - 1):
                layers.append(InvertedResidual(cin, c(out), expansion, s))
                cin = c(out)
        self.layers = nn.Sequential(*layers)
        self.conv2 = nn.Conv2d(cin, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        return self.fc(self.flatten(self.pool(out)))


@register_model("mobilenetv2", input_sizes=(32,), description="MobileNetV2 for 32x32 inputs (KDIGA CIFAR student)")
def mobilenetv2(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2 with CIFAR strides; ``width_mult`` scales channels."""
    return MobileNetV2(num_classes, in_chans, width_mult)
