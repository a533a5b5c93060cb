"""Backbones: plain ``nn.Module`` s that map images to features; no meta-learning inside."""

from lightning_metakd.models.conv4 import Conv4
from lightning_metakd.models.resnet12 import ResNet12
from lightning_metakd.models.vit import VisionTransformer

__all__ = ["Conv4", "ResNet12", "VisionTransformer"]
