"""A backbone with a linear head: the model that MAML-family algorithms adapt."""

from __future__ import annotations

from torch import Tensor, nn


class Classifier(nn.Module):
    """``backbone`` followed by ``head = nn.Linear(backbone.num_features, ways)``.

    Parameter names are ``backbone.*`` and ``head.*``, so an algorithm can adapt the head alone
    (ANIL) by name. ``forward_features`` exposes the embedding for feature distillation.

    Example:
        >>> import torch
        >>> from lightning_metakd.models import Conv4
        >>> Classifier(Conv4(hidden=32), ways=5)(torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3, 5])
    """

    def __init__(self, backbone: nn.Module, ways: int):
        super().__init__()
        if not hasattr(backbone, "num_features"):
            raise ValueError(
                f"{type(backbone).__name__} has no `num_features` attribute; a backbone must state "
                "the size of the embedding its forward returns."
            )
        self.backbone = backbone
        self.ways = ways
        self.head = nn.Linear(backbone.num_features, ways)

    def tap_points(self) -> dict[str, list[str]]:
        """The backbone's tap points (``backbone.tap_points()``) under this module's ``backbone.`` prefix."""
        points = getattr(self.backbone, "tap_points", None)
        if points is None:
            return {}
        return {kind: [f"backbone.{p}" for p in paths] for kind, paths in points().items()}

    def forward_features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))
