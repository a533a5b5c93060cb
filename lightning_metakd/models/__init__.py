"""Backbones: plain ``nn.Module`` s that map images to features; no meta-learning inside."""

from lightning_metakd.models.conv4 import Conv4

__all__ = ["Conv4"]
