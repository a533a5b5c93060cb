"""TensorBoard callbacks: what lands in the event files, and that they are on by default."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TinyDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.callbacks import (
    AttentionMaps,
    BestAndLastCheckpoint,
    EpisodeImages,
    HyperparameterMetrics,
    class_token_attention,
    episode_grid,
    run_hyperparameters,
)
from lightning_metakd.distill import AttentionDistillation, TaskLoss
from lightning_metakd.lightning_cli import run_lightning_cli
from lightning_metakd.models import Conv4, VisionTransformer
from lightning_metakd.modules import DistillationModule, MetaLearnerModule

ROOT = Path(__file__).resolve().parents[1]
CALLBACKS = (EpisodeImages, AttentionMaps, HyperparameterMetrics)


def events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def image_pixels(accumulator: EventAccumulator, tag: str) -> torch.Tensor:
    """The logged image ``[H, W, 3]`` in ``[0, 1]``."""
    import io

    import numpy as np
    from PIL import Image

    (event,) = accumulator.Images(tag)
    image = Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")
    return torch.from_numpy(np.asarray(image).copy()).float() / 255


def image_shape(accumulator: EventAccumulator, tag: str) -> tuple[int, int]:
    return tuple(image_pixels(accumulator, tag).shape[:2])


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return L.Trainer(
        logger=TensorBoardLogger(tmp_path, name="run", version=0, default_hp_metric=False),
        callbacks=[*(c() for c in CALLBACKS), ModelCheckpoint(monitor="val/acc", mode="max")],
        max_steps=2, accelerator="cpu", devices=1,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        **kwargs,
    )  # fmt: skip


def test_episode_grid_rows_are_classes():
    support_x = torch.arange(3.0)[:, None, None, None].expand(3, 1, 4, 4) + 1  # class c is c+1
    query_x = torch.arange(3.0).repeat_interleave(2)[:, None, None, None].expand(6, 1, 4, 4) + 1
    grid = episode_grid(support_x, torch.arange(3), query_x, torch.arange(3).repeat_interleave(2))
    tile = 4 + 2  # tiles are 4 px with 2 px padding: 3 rows of support, blank, 2 queries
    assert grid.shape == (3, 2 + 3 * tile, 2 + 4 * tile)
    # Constant images min-max scale to 0; the padding shows 0.5 between tiles.
    assert grid[:, 2:6, 2:6].eq(0).all() and grid[:, 0:2].eq(0.5).all()


def test_class_token_attention_is_row_zero_averaged_over_heads():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=8, patch_size=4, embed_dim=8, depth=2, heads=2)
    images = torch.rand(3, 1, 8, 8)
    maps = class_token_attention(vit, images, layer=0)
    _, attentions = vit(images, return_attention=True)
    expected = attentions[0][:, :, 0, 1:].mean(1).reshape(3, 2, 2)
    torch.testing.assert_close(maps, expected)
    # With the class token's attention to itself, each row sums to one.
    torch.testing.assert_close(
        maps.flatten(1).sum(1) + attentions[0][:, :, 0, 0].mean(1), torch.ones(3)
    )


def test_episode_image_and_final_metrics_are_logged(tmp_path):
    dm = TinyDataModule(ways=3, shots=2, queries=4, meta_batch_size=2, steps_per_epoch=2,
                        val_episodes=4, test_episodes=6)  # fmt: skip
    torch.manual_seed(0)
    learner = MetaLearnerModule(Conv4(hidden=4, image_size=8), ProtoNet(), ways=3)
    run = trainer(tmp_path)
    run.fit(learner, dm)
    (result,) = run.test(learner, dm, verbose=False)
    log = events(run.logger.log_dir)
    # 3 classes x (2 support + blank + 4 queries) tiles of 8 px, 2 px padding.
    assert image_shape(log, "episode/train") == (2 + 3 * 10, 2 + 7 * 10)
    assert "attention/teacher_vs_student" not in log.Tags()["images"]
    (acc,) = log.Scalars("hp/test_acc")
    assert acc.value == pytest.approx(result["test/acc"], abs=1e-6)
    (ci,) = log.Scalars("hp/test_acc_ci95")
    assert ci.value == pytest.approx(result["test/acc_ci95"], abs=1e-6)
    (val,) = log.Scalars("hp/val_acc")
    assert val.value == pytest.approx(float(run.checkpoint_callback.best_model_score), abs=1e-6)
    plugins = log.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in plugins


def test_run_hyperparameters_are_flat_and_name_the_components():
    learner = MetaLearnerModule(Conv4(hidden=4, image_size=8), ProtoNet(), ways=3)
    params = run_hyperparameters(learner, TinyDataModule(ways=3))
    assert params["model/ways"] == 3
    assert params["model/backbone/class_path"] == "lightning_metakd.models.conv4.Conv4"
    assert params["model/backbone/init_args/hidden"] == 4
    assert params["data/ways"] == 3 and params["model/vmap_tasks"] == "None"
    assert all(isinstance(v, int | float | str | bool) for v in params.values())


def test_attention_maps_of_a_vit_distiller(tmp_path):
    dm = TinyDataModule(ways=3, shots=1, queries=3, meta_batch_size=1, steps_per_epoch=2,
                        val_episodes=2, test_episodes=2)  # fmt: skip
    torch.manual_seed(0)
    vit = dict(image_size=8, patch_size=4, embed_dim=8, heads=2)
    teacher = MetaLearnerModule(VisionTransformer(depth=2, **vit), ProtoNet(), ways=3)
    distiller = DistillationModule(
        teacher, VisionTransformer(depth=1, **vit), ProtoNet(), ways=3,
        terms=[TaskLoss(), AttentionDistillation(weight=1.0)],
    )  # fmt: skip
    run = trainer(tmp_path, num_sanity_val_steps=0)
    run.fit(distiller, dm)
    log = events(run.logger.log_dir)
    # 4 query images (rows) x (image, teacher map, student map), 8 px tiles, 2 px padding.
    pixels = image_pixels(log, "attention/teacher_vs_student")
    assert pixels.shape == (2 + 4 * 10, 2 + 3 * 10, 3)
    query = next(iter(dm.val_dataloader())).query_x[0, :4]
    for column, learner in ((1, distiller.teachers[0]), (2, distiller.student)):
        maps = class_token_attention(learner.backbone, query)  # [4, 2, 2]
        low, high = maps.amin((1, 2), keepdim=True), maps.amax((1, 2), keepdim=True)
        expected = ((maps - low) / (high - low)).repeat_interleave(4, 1).repeat_interleave(4, 2)
        x = 2 + column * 10
        tiles = torch.stack([pixels[2 + r * 10 : 10 + r * 10, x : x + 8, 0] for r in range(4)])
        torch.testing.assert_close(tiles, expected, atol=1 / 255 + 1e-6, rtol=0)
    params = run_hyperparameters(distiller)
    assert params["model/student_backbone/init_args/depth"] == 1


def test_callbacks_without_tensorboard_do_nothing(tmp_path):
    dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=1, steps_per_epoch=1,
                        val_episodes=2, test_episodes=2)  # fmt: skip
    learner = MetaLearnerModule(Conv4(hidden=4, image_size=8), ProtoNet(), ways=3)
    run = L.Trainer(logger=False, callbacks=[c() for c in CALLBACKS], max_steps=1,
                    enable_progress_bar=False, enable_checkpointing=False,
                    default_root_dir=tmp_path)  # fmt: skip
    run.fit(learner, dm)
    run.test(learner, dm, verbose=False)
    assert not list(tmp_path.rglob("events.out.tfevents.*"))


def test_the_command_turns_them_on(tmp_path):
    config = ROOT / "configs" / "kanji" / "protonet.yaml"
    cli = run_lightning_cli(["--config", str(config), "--trainer.default_root_dir", str(tmp_path)],
                            run=False)  # fmt: skip
    kinds = {type(c) for c in cli.trainer.callbacks}
    assert set(CALLBACKS) <= kinds
    cli = run_lightning_cli(["--config", str(config), "--trainer.callbacks=[]"], run=False)
    assert not set(CALLBACKS) & {type(c) for c in cli.trainer.callbacks}


@pytest.mark.parametrize("bad", [{"max_queries": 0}])
def test_bad_arguments(bad):
    with pytest.raises(ValueError, match="max_queries must be at least 1"):
        EpisodeImages(**bad)


class _FixedScore(L.Callback):
    """Logs a validation score that never improves after the first epoch."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("val/fixed", 1.0)


@pytest.mark.parametrize("cls", [BestAndLastCheckpoint, ModelCheckpoint])
def test_last_checkpoint_is_the_latest_even_without_improvement(tmp_path, cls):
    """Lightning's own ModelCheckpoint (the control) leaves last.ckpt at the best epoch."""
    checkpoint = cls(
        dirpath=tmp_path, monitor="val/fixed", mode="max", filename="best", save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, limit_val_batches=1, num_sanity_val_steps=0,
        callbacks=[_FixedScore(), checkpoint], logger=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    model = MetaLearnerModule(Conv4(hidden=4, image_size=16), ProtoNet(), ways=3)
    data = TinyDataModule(
        ways=3, shots=1, queries=1, steps_per_epoch=2, val_episodes=2, image_size=16
    )
    trainer.fit(model, data)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    best = torch.load(tmp_path / "best.ckpt", weights_only=True)
    assert best["global_step"] == 2  # the only improvement: epoch 0
    expected = trainer.global_step if cls is BestAndLastCheckpoint else 2
    assert last["global_step"] == expected
    assert trainer.global_step == 6
