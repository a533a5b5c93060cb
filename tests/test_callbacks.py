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
from lightning_metakd.callbacks.attention_maps import attention_grid, heat_colours, query_images
from lightning_metakd.callbacks.tensorboard import WRONG, labelled_grid, to_rgb
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


def test_episode_grid_rows_are_classes_with_titled_columns():
    support_x = torch.arange(3.0)[:, None, None, None].expand(3, 1, 4, 4) + 1  # class c is c+1
    query_x = torch.arange(3.0).repeat_interleave(2)[:, None, None, None].expand(6, 1, 4, 4) + 1
    query_x = query_x + torch.rand(6, 1, 4, 4)  # min-max scaling keeps each query's pattern
    query_y = torch.arange(3).repeat_interleave(2)
    picture = episode_grid(support_x, torch.arange(3), query_x, query_y, scale=5)
    texts = dict(picture.labels)
    assert list(texts) == ["3-way 1-shot, 2 queries per class", "support", "queries",
                           "class 0", "class 1", "class 2"]  # fmt: skip
    # Row r holds class r: column 0 its support image, columns 1-2 its queries, 4 px at 5x.
    assert sorted(picture.tiles) == [(r, c) for r in range(3) for c in range(3)]
    for (r, c), (left, top, right, bottom) in picture.tiles.items():
        assert (right - left, bottom - top) == (20, 20)
        expected = to_rgb(query_x[2 * r + c - 1 : 2 * r + c]) if c else torch.zeros(1, 3, 4, 4)
        expected = expected[0].repeat_interleave(5, 1).repeat_interleave(5, 2)
        torch.testing.assert_close(picture.image[:, top:bottom, left:right], expected,
                                   atol=1 / 255, rtol=0)  # fmt: skip
    # Column titles sit above their columns, row labels left of their rows, a gap between blocks.
    support, queries = picture.tiles[0, 0], picture.tiles[0, 1]
    assert texts["support"][3] <= support[1] and texts["queries"][3] <= queries[1]
    centre = {name: (texts[name][0] + texts[name][2]) / 2 for name in ("support", "queries")}
    assert abs(centre["support"] - (support[0] + support[2]) / 2) <= 1
    assert abs(centre["queries"] - (queries[0] + picture.tiles[0, 2][2]) / 2) <= 1
    assert queries[0] - support[2] > picture.tiles[0, 2][0] - queries[2]
    for r in range(3):
        label, tile = texts[f"class {r}"], picture.tiles[r, 0]
        assert label[2] <= tile[0] and label[1] < (tile[1] + tile[3]) / 2 < label[3]
    # The text is drawn (ink where the labels are) and legible: at least 10 px high.
    for text, (left, top, right, bottom) in picture.labels:
        assert picture.image[:, top:bottom, left:right].amin() < 0.3, text
    assert all(box[3] - box[1] >= 10 for _, box in picture.labels)


def test_labelled_grid_frames_and_captions_only_where_asked():
    tiles = [[torch.full((3, 6, 6), 0.5) for _ in range(3)] for _ in range(2)]
    picture = labelled_grid(tiles, scale=4, captions={(0, 0): "a long caption to cut"},
                            frames={(1, 2): WRONG})  # fmt: skip
    ((text, box),) = picture.labels
    assert text.endswith("…") and box[2] - box[0] <= 24 + 4  # cut to the tile's width
    red = torch.tensor(WRONG, dtype=torch.float32)[:, None] / 255
    for (r, c), (left, top, right, _) in picture.tiles.items():
        ring = picture.image[:, top - 2, left:right]  # the padding row just above the tile
        assert ring.sub(red).abs().amax() < 1e-6 if (r, c) == (1, 2) else ring.eq(1).all()
    with pytest.raises(ValueError, match="every tile"):
        labelled_grid([[torch.zeros(3, 4, 4), torch.zeros(3, 5, 5)]])


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
    # The picture of the first task of the training sampler's epoch-0 list, labelled.
    dm.setup("fit")
    expected = episode_grid(*dm.splits["train"][next(iter(dm.sampler("train")))][:4])
    torch.testing.assert_close(image_pixels(log, "episode/train"), expected.image.permute(1, 2, 0))
    # 3 classes x (2 support + 4 queries) tiles, 8 px images shown at 10x.
    assert sorted(expected.tiles) == [(r, c) for r in range(3) for c in range(6)]
    assert {(b[2] - b[0], b[3] - b[1]) for b in expected.tiles.values()} == {(80, 80)}
    assert image_shape(log, "episode/train") == (318, 608)
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
    pixels = image_pixels(log, "attention/teacher_vs_student")
    episode = next(iter(dm.val_dataloader()))
    query, labels = query_images(episode.query_x[0], episode.query_y[0], 4)
    assert labels.tolist() == [0, 1, 2, 0]  # one query per class first
    teacher, student = (class_token_attention(m.backbone, query)
                        for m in (distiller.teachers[0], distiller.student))  # fmt: skip
    picture = attention_grid(query, teacher, student, labels,
                             titles=("teacher\nblock 2 of 2", "student\nblock 1 of 1"))  # fmt: skip
    torch.testing.assert_close(pixels, picture.image.permute(1, 2, 0))
    assert [text for text, _ in picture.labels][1:4] == [
        "image", "teacher\nblock 2 of 2", "student\nblock 1 of 1"]  # fmt: skip
    # 8 px images at 14x (112 px tiles); each [2, 2] map covers its tile in 4 blocks of 56 px.
    for column, maps in ((1, teacher), (2, student)):
        colours = heat_colours(maps).repeat_interleave(56, 2).repeat_interleave(56, 3)
        for row in range(4):
            left, top, right, bottom = picture.tiles[row, column]
            assert (right - left, bottom - top) == (112, 112)
            torch.testing.assert_close(picture.image[:, top:bottom, left:right], colours[row],
                                       atol=1 / 255, rtol=0)  # fmt: skip
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
