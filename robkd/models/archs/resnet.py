"""CIFAR-style ResNet-18 (He et al.) and PreAct-ResNet-18 (He et al. 2016b), 3x3 stem."""

from __future__ import annotations

from torch import nn
import torch.nn.functional as F

from robkd.models.registry import register_model


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    """ResNet for small images; ``preact=True`` gives the pre-activation variant."""

    def __init__(self, block, num_blocks, num_classes: int = 10, in_chans: int = 3, preact: bool = False) -> None:
        super().__init__()
        self.preact = preact
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn1_final(out))
        return self.fc(self.flatten(self.pool(out)))


class PreActResNet(ResNet):
    def __init__(self, num_blocks, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__(PreActBlock, num_blocks, num_classes, in_chans, preact=True)
        del self.bn1
        self.bn1_final = nn.BatchNorm2d(512)


@register_model("resnet18", input_sizes=(28, 32, 64), description="CIFAR-style ResNet-18 (3x3 stem, no max-pool)")
def resnet18(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """CIFAR ResNet-18; works for any input size >= 8 (global average pooling)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans)


@register_model("preact_resnet18", input_sizes=(28, 32, 64), description="Pre-activation ResNet-18 (CIFAR style)")
def preact_resnet18(num_classes: int = 10, in_chans: int = 3, img_size: int = 32) -> nn.Module:
    """PreAct-ResNet-18 as used by the fast-AT / RobustBench literature."""
    return PreActResNet([2, 2, 2, 2], num_classes, in_chans)
