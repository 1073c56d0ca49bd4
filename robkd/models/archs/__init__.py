"""Built-in architectures; importing this package registers them all."""

from robkd.models.archs import mobilenetv2, resnet, small, wideresnet  # noqa: F401
