"""Conv4: the four-block convolutional backbone of MAML and Prototypical Networks."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv_block(in_channels: int, out_channels: int, pool: bool = True) -> nn.Sequential:
    """3x3 conv → BatchNorm → ReLU → 2x2 max-pool: one block of Conv4 (Vinyals et al. 2016)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(inplace=False),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def block_tap_points(features: nn.Sequential, prefix: str = "features") -> dict[str, list[str]]:
    """The tap points of a backbone whose ``features`` is a sequence of conv blocks.

    ``"blocks"``: the output of every block ``[B, C, h, w]`` (attention transfer, hints at several
    depths); ``"features"``: the default hint layer, the last block (module paths for
    :func:`~lightning_metakd.distill.taps.tap`). Shared by Conv4 and ResNet12.
    """
    blocks = [f"{prefix}.{i}" for i in range(len(features))]
    return {"blocks": blocks, "features": blocks[-1:]}


class Conv4(nn.Module):
    """Four conv blocks of ``hidden`` channels, then a flattened embedding.

    The backbone of MAML (Finn et al. 2017) and Prototypical Networks (Snell et al. 2017). On
    28x28 Omniglot-like images the embedding has ``hidden`` features (the map pools down to 1x1);
    on 84x84 mini-ImageNet images it has ``hidden * 5 * 5``.

    BatchNorm uses the statistics of the batch it sees (``track_running_stats=False``): the
    transductive convention of MAML, identical in training and evaluation, and safe under
    ``torch.func.vmap`` because no running buffers are written.

    Args:
        in_channels: image channels (1 for Omniglot/KanjiVG, 3 for mini-ImageNet).
        hidden: channels of every block (64 in the papers).
        width: width multiplier applied to ``hidden`` — a student is the same family, only narrower.
        image_size: input side length, used to compute :attr:`num_features`.
        channels_last: store the convolution weights channels-last (NHWC), which makes oneDNN
            pick its faster CPU kernels: a 20-way 1-shot ProtoNet training step (120 images of
            28x28, one thread) 1.31-1.40x faster and a forward pass 1.83-2.43x faster, Conv4-8
            to Conv4-64 (``benchmarks/conv_layout.py``, paired; not measured on GPUs). The
            outputs agree to float rounding (within 4e-5), not bit for bit; ``False`` gives the
            kernels of lightning-metakd 0.1, with which numbers measured before this option
            reproduce exactly (README "What is reproducible").

    Example:
        >>> import torch
        >>> net = Conv4(in_channels=1, hidden=64)
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 64])
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        width: float = 1.0,
        image_size: int = 28,
        channels_last: bool = True,
    ):
        super().__init__()
        channels = max(1, round(hidden * width))
        self.in_channels, self.hidden, self.width, self.image_size = (
            in_channels,
            hidden,
            width,
            image_size,
        )
        # Each block halves the map; on images too small for four halvings the last blocks skip
        # the pooling instead of failing (a 16x16 input ends at 1x1 like 28x28 does).
        blocks, side = [], image_size
        for i in range(4):
            pool = side >= 2
            blocks.append(conv_block(in_channels if i == 0 else channels, channels, pool=pool))
            side = side // 2 if pool else side
        self.features = nn.Sequential(*blocks)
        self.channels = channels
        self.num_features = channels * side**2
        self.channels_last = channels_last
        if channels_last:  # the weights keep this layout through .to(device), copies, loading
            self.to(memory_format=torch.channels_last)

    def tap_points(self) -> dict[str, list[str]]:
        """Where distillation taps this network: :func:`block_tap_points` of its conv blocks."""
        return block_tap_points(self.features)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last feature map ``[B, channels, h, w]``."""
        return self.features(x)

    def forward(self, x: Tensor) -> Tensor:
        """The flattened embedding ``[B, num_features]``."""
        return self.forward_features(x).flatten(1)
