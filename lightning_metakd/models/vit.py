"""A small Vision Transformer whose attention maps can be returned (and distilled)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head self-attention that exposes its probabilities.

    ``softmax(Q Kᵀ / √d_head) V`` per head (Vaswani et al. 2017, Eq. 1), written out instead of
    calling ``scaled_dot_product_attention`` so the probabilities can be returned for attention
    distillation and so the module runs under ``torch.func`` transforms.

    Shapes: ``[B, T, dim]`` → ``([B, T, dim], [B, heads, T, T])``; every probability row sums to 1.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding dim {dim} is not divisible by heads={heads}.")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # An identity on the probabilities gives them a module path of their own: the tap of
        # attention distillation (``blocks.<i>.attention.probabilities``).
        self.probabilities = nn.Identity()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attention = self.probabilities(
            torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        )
        out = (attention @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out), attention


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: ``x + MSA(LN(x))`` then ``x + MLP(LN(x))`` (Dosovitskiy et al. 2021,
    Eqs. 2-3), with a GELU MLP of hidden size ``mlp_ratio * dim``.

    Shapes: ``[B, T, dim]`` → ``([B, T, dim], [B, heads, T, T])``.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0):
        super().__init__()
        hidden = max(1, round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        attended, attention = self.attention(self.norm1(x))
        x = x + attended
        x = x + self.mlp(self.norm2(x))
        return x, attention


class VisionTransformer(nn.Module):
    """A small ViT (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words") for few-shot images.

    The image is cut into ``patch_size`` squares by a strided convolution, a learnable class token
    is prepended, learnable position embeddings are added, and ``depth`` pre-norm blocks of
    multi-head self-attention + MLP follow; a final LayerNorm precedes the read-out. The embedding
    is the class token, ``[B, num_features]`` with ``num_features == embed_dim``.

    Only LayerNorm is used, so outputs of one image never depend on the rest of the batch and the
    model is safe under ``torch.func.functional_call``, ``grad`` and ``vmap``.
    ``forward(x, return_attention=True)`` also returns every block's attention probabilities — the
    maps that attention distillation matches between teacher and student.

    With the defaults a 28x28 image gives 7x7 = 49 patches, so ``tokens = 50``.

    Args:
        image_size: input side length; must be divisible by ``patch_size``.
        patch_size: side of a square patch (the stride of the patch embedding).
        in_channels: image channels (1 for Omniglot/KanjiVG, 3 for mini-ImageNet).
        embed_dim: token width before the width multiplier.
        depth: number of transformer blocks.
        heads: attention heads per block.
        mlp_ratio: MLP hidden size as a multiple of the token width.
        width: multiplier for ``embed_dim``; the result is rounded to a multiple of ``heads``
            (at least ``heads``) so heads keep an integer size.

    Example:
        >>> import torch
        >>> vit = VisionTransformer(image_size=28, patch_size=4, embed_dim=32, depth=2, heads=4)
        >>> vit(torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3, 32])
        >>> embedding, attentions = vit(torch.zeros(3, 1, 28, 28), return_attention=True)
        >>> len(attentions), attentions[0].shape
        (2, torch.Size([3, 4, 50, 50]))
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 4,
        in_channels: int = 1,
        embed_dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        width: float = 1.0,
    ):
        super().__init__()
        if patch_size < 1 or image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} must be a multiple of patch_size={patch_size}; "
                "pick e.g. patch_size=4 for 28 px or patch_size=12 for 84 px."
            )
        if min(embed_dim, depth, heads) < 1 or width <= 0 or mlp_ratio <= 0:
            raise ValueError(
                "embed_dim, depth and heads must be positive integers and width, mlp_ratio "
                f"positive; got embed_dim={embed_dim}, depth={depth}, heads={heads}, "
                f"width={width}, mlp_ratio={mlp_ratio}."
            )
        dim = max(1, round(embed_dim * width / heads)) * heads
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.embed_dim, self.depth, self.heads = dim, depth, heads
        self.mlp_ratio, self.width = mlp_ratio, width
        self.num_patches = (image_size // patch_size) ** 2
        self.num_tokens = self.num_patches + 1
        self.num_features = dim

        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def _check_input(self, x: Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"VisionTransformer expects images [B, {', '.join(map(str, expected))}], "
                f"got {tuple(x.shape)}; position embeddings fix the size, so resize the images or "
                "build the model with the matching image_size/in_channels."
            )

    def _encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        self._check_input(x)
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, num_patches, dim]
        cls = self.cls_token.expand(patches.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + self.pos_embed
        attentions = []
        for block in self.blocks:
            tokens, attention = block(tokens)
            attentions.append(attention)
        return self.norm(tokens), attentions

    def tap_points(self) -> dict[str, list[str]]:
        """Where distillation taps this network (module paths, see :func:`~lightning_metakd.distill.taps.tap`).

        ``"blocks"``: every block's token sequence ``[B, tokens, dim]``; ``"features"``: the
        final LayerNorm (the default hint layer); ``"attention"``: every block's attention
        probabilities ``[B, heads, tokens, tokens]`` (attention distillation).
        """
        blocks = [f"blocks.{i}" for i in range(len(self.blocks))]
        return {
            "blocks": blocks,
            "features": ["norm"],
            "attention": [f"{b}.attention.probabilities" for b in blocks],
        }

    def forward_features(self, x: Tensor) -> Tensor:
        """The normalised token sequence ``[B, tokens, dim]``; token 0 is the class token."""
        return self._encode(x)[0]

    def forward(
        self, x: Tensor, return_attention: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """The class-token embedding ``[B, num_features]``.

        With ``return_attention=True`` returns ``(embedding, attentions)``: a list of ``depth``
        tensors ``[B, heads, tokens, tokens]`` whose rows sum to 1 (row 0 is where the class token
        looks).
        """
        tokens, attentions = self._encode(x)
        embedding = tokens[:, 0]
        if return_attention:
            return embedding, attentions
        return embedding
