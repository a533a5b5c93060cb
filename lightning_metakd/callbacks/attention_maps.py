"""Teacher's and student's ViT attention maps side by side in TensorBoard, titled and legible."""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_metakd.callbacks.tensorboard import (
    Picture,
    labelled_grid,
    tensorboard_experiment,
    tile_scale,
    to_rgb,
)
from lightning_metakd.data import Episode
from lightning_metakd.models import VisionTransformer


def class_token_attention(backbone: VisionTransformer, images: Tensor, layer: int = -1) -> Tensor:
    """Where the class token looks: ``[B, g, g]`` attention over the ``g x g`` patch grid.

    Row 0 of block ``layer``'s attention probabilities (Dosovitskiy et al. 2021), averaged over
    heads, without the class token's attention to itself, reshaped to the patch grid.

    Example:
        >>> vit = VisionTransformer(image_size=28, patch_size=7, embed_dim=16, depth=2, heads=2)
        >>> class_token_attention(vit, torch.rand(3, 1, 28, 28)).shape
        torch.Size([3, 4, 4])
    """
    with torch.no_grad():
        _, attentions = backbone(images, return_attention=True)
    row = attentions[layer][:, :, 0, 1:].mean(1)  # [B, patches]
    side = backbone.image_size // backbone.patch_size
    return row.reshape(-1, side, side)


def heat_colours(maps: Tensor, colormap: str = "inferno") -> Tensor:
    """``[B, h, w]`` maps → ``[B, 3, h, w]`` colours, each map min-max scaled on its own.

    A perceptual colormap (dark: little attention, bright yellow: most) reads better than grey
    next to the grey image it explains.
    """
    import matplotlib

    low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
    scaled = ((maps - low) / (high - low).clamp_min(1e-8)).detach().float().cpu().numpy()
    colours = matplotlib.colormaps[colormap](scaled)[..., :3]  # [B, h, w, 3]
    return torch.from_numpy(np.ascontiguousarray(colours)).float().permute(0, 3, 1, 2)


def block_title(who: str, layer: int, depth: int) -> str:
    """``"teacher\\nblock 4 of 4"`` for ``layer=-1`` of a 4-block network (blocks counted from 1).

    Example:
        >>> block_title("student", -1, 2), block_title("teacher", 0, 4)
        ('student\\nblock 2 of 2', 'teacher\\nblock 1 of 4')
    """
    return f"{who}\nblock {range(depth)[layer] + 1} of {depth}"


def attention_grid(
    images: Tensor,
    teacher_maps: Tensor,
    student_maps: Tensor,
    labels: Tensor | None = None,
    titles: tuple[str, str] = ("teacher", "student"),
    scale: int | None = None,
) -> Picture:
    """Query images and two networks' attention on them: a row per image, three titled columns.

    Columns ``image``, then ``titles[0]`` and ``titles[1]`` (e.g. :func:`block_title`); each map
    ``[g, g]`` is upsampled to the image size (nearest: one block per patch) and coloured by
    :func:`heat_colours`; rows are labelled ``class c`` when ``labels`` are given.

    Args:
        images: ``[B, C, H, W]``.
        teacher_maps, student_maps: ``[B, g, g]`` (:func:`class_token_attention`).
        labels: ``[B]`` episode labels of the images.
        scale: tile upscaling (default :func:`tile_scale` with 112 px tiles: 28 px at 4x).
    """
    size = images.shape[-2:]
    columns = [to_rgb(images)]
    for maps in (teacher_maps, student_maps):
        columns.append(heat_colours(F.interpolate(maps[:, None].float(), size=size)[:, 0]))
    tiles = [list(row) for row in zip(*columns, strict=True)]
    return labelled_grid(
        tiles,
        scale=tile_scale(size[-1], 112) if scale is None else scale,
        title="class-token attention on query images\n(each map scaled on its own; bright: most)",
        column_titles=[(0, 1, "image"), (1, 1, titles[0]), (2, 1, titles[1])],
        row_labels=[] if labels is None else [f"class {int(y)}" for y in labels],
    )


def query_images(query_x: Tensor, query_y: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Up to ``count`` query images of one task, one per class first: ``([n, C, H, W], [n])``.

    Example:
        >>> _, labels = query_images(torch.zeros(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 2]), 4)
        >>> labels.tolist()
        [0, 1, 2, 0]
    """
    rank = torch.zeros_like(query_y)
    for c in query_y.unique():
        members = query_y == c
        rank[members] = torch.arange(int(members.sum()), device=query_y.device)
    order = sorted(range(len(query_y)), key=lambda i: (int(rank[i]), int(query_y[i])))[:count]
    return query_x[order], query_y[order]


def _vit(learner: Any) -> VisionTransformer | None:
    backbone = getattr(learner, "backbone", None)
    return backbone if isinstance(backbone, VisionTransformer) else None


class AttentionMaps(Callback):
    """Teacher's and student's attention maps side by side, on one validation episode.

    For a :class:`~lightning_metakd.modules.DistillationModule` whose teacher and student backbones
    are both :class:`~lightning_metakd.models.VisionTransformer` s (attention distillation,
    ``L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²``), logs after every validation epoch an image
    ``attention/teacher_vs_student`` (:func:`attention_grid`): a row per query image of the first
    validation task, one per class first (labelled ``class c``), and the columns ``image``,
    ``teacher (block k of n)`` and ``student (block k of n)`` — the class-token attention
    (:func:`class_token_attention` of block ``layer``) upsampled to the image size and coloured.
    The maps come from the meta-learned initial parameters θ (the network a metric-based learner
    classifies with). Other modules: no-op.

    Args:
        images: query images shown (rows).
        layer: which block's attention (``-1``: the last one of each network).
        tag: the TensorBoard image tag.
    """

    def __init__(self, images: int = 4, layer: int = -1, tag: str = "attention/teacher_vs_student"):
        if images < 1:
            raise ValueError(f"images must be at least 1, got {images}.")
        self.images, self.layer, self.tag = images, layer, tag
        self._query: tuple[Tensor, Tensor] | None = None

    def _backbones(self, pl_module: L.LightningModule) -> tuple[Any, Any] | None:
        teachers = getattr(pl_module, "teachers", None)
        student = getattr(pl_module, "student", None)
        t, s = _vit(teachers[0] if teachers else None), _vit(student)
        return (t, s) if t is not None and s is not None else None

    def on_validation_batch_start(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and isinstance(batch, Episode):
            x, y = query_images(batch.query_x[0], batch.query_y[0], self.images)
            self._query = (x.detach(), y.detach())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        query, self._query = self._query, None
        if query is None or trainer.sanity_checking:
            return
        writer = tensorboard_experiment(trainer)
        backbones = self._backbones(pl_module)
        if writer is None or backbones is None:
            return
        images, labels = query
        maps = [
            class_token_attention(b, images.to(pl_module.device), self.layer) for b in backbones
        ]
        titles = [
            block_title(w, self.layer, len(b.blocks))
            for w, b in zip(("teacher", "student"), backbones, strict=True)
        ]
        picture = attention_grid(images, *maps, labels, titles=tuple(titles))
        writer.add_image(self.tag, picture.image, global_step=trainer.global_step)


__all__ = [
    "AttentionMaps",
    "attention_grid",
    "block_title",
    "class_token_attention",
    "heat_colours",
    "query_images",
]
