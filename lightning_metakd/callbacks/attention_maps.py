"""Teacher's and student's ViT attention maps side by side in TensorBoard."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_metakd.callbacks.tensorboard import tensorboard_experiment, to_rgb
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


def _vit(learner: Any) -> VisionTransformer | None:
    backbone = getattr(learner, "backbone", None)
    return backbone if isinstance(backbone, VisionTransformer) else None


class AttentionMaps(Callback):
    """Teacher's and student's attention maps side by side, on one validation episode.

    For a :class:`~lightning_metakd.modules.DistillationModule` whose teacher and student backbones
    are both :class:`~lightning_metakd.models.VisionTransformer` s (attention distillation,
    ``L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²``), logs after every validation epoch an image
    ``attention/teacher_vs_student``: one row per query image of the first validation task — the
    image, the teacher's class-token attention and the student's (:func:`class_token_attention`
    of block ``layer``, upsampled to the image size). The maps come from the meta-learned initial
    parameters θ (the network a metric-based learner classifies with). Other modules: no-op.

    Args:
        images: query images shown (rows).
        layer: which block's attention (``-1``: the last one of each network).
        tag: the TensorBoard image tag.
    """

    def __init__(self, images: int = 4, layer: int = -1, tag: str = "attention/teacher_vs_student"):
        if images < 1:
            raise ValueError(f"images must be at least 1, got {images}.")
        self.images, self.layer, self.tag = images, layer, tag
        self._query: Tensor | None = None

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
            self._query = batch.query_x[0, : self.images].detach()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        query, self._query = self._query, None
        if query is None or trainer.sanity_checking:
            return
        writer = tensorboard_experiment(trainer)
        backbones = self._backbones(pl_module)
        if writer is None or backbones is None:
            return
        rows = [to_rgb(query)]
        for backbone in backbones:
            maps = class_token_attention(backbone, query.to(pl_module.device), self.layer)
            maps = F.interpolate(maps[:, None].float(), size=query.shape[-2:], mode="nearest")
            rows.append(to_rgb(maps))
        tiles = torch.stack(rows, dim=1).flatten(0, 1)  # image, teacher, student per query
        from torchvision.utils import make_grid

        grid = make_grid(tiles, nrow=3, padding=2, pad_value=0.5)
        writer.add_image(self.tag, grid, global_step=trainer.global_step)


__all__ = ["AttentionMaps", "class_token_attention"]
