"""Augmented views (lightning_metakd.data.augment): shapes, values, seeding, and YAML configs."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import TinyDataModule, make_class_dataset

from lightning_metakd.data import ClassDataset, TaskSpec
from lightning_metakd.data.augment import (
    Compose,
    ElasticDistortion,
    RandomAffine,
    RandomDilation,
    RandomFitToFrame,
    RandomLowResolution,
    gaussian_kernel,
)
from lightning_metakd.data.dataset import fixed_view_seed, view_seeds
from lightning_metakd.lightning_cli import run_lightning_cli

pytestmark = pytest.mark.usefixtures("one_thread")

TRANSFORMS = {
    "affine": lambda: RandomAffine(degrees=30, shear=15, scale=(0.8, 1.2), translate=0.1),
    "elastic": lambda: ElasticDistortion(alpha=34.0, sigma=4.0),
    "both": lambda: Compose([RandomAffine(), ElasticDistortion(alpha=8.0, sigma=3.0)]),
    "low_resolution": lambda: RandomLowResolution(probability=1.0, sizes=(2, 11)),
}


def strokes(channels: int = 1, size: int = 28) -> torch.Tensor:
    """A cross of white strokes on black, in [0, 1]."""
    image = torch.zeros(channels, size, size)
    image[:, size // 2 - 2 : size // 2 + 2, 4:-4] = 1.0
    image[:, 4:-4, size // 2 - 1 : size // 2 + 1] = 0.7
    return image


@pytest.mark.parametrize("make", TRANSFORMS.values(), ids=TRANSFORMS)
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 16, 16), (5, 1, 12, 12)])
def test_shapes_and_values_stay_in_range(make, shape):
    torch.manual_seed(0)
    image = torch.rand(shape)
    out = make()(image)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6  # convex combinations of pixels and fill
    assert not torch.allclose(out, image)


@pytest.mark.parametrize("make", TRANSFORMS.values(), ids=TRANSFORMS)
def test_determinism_given_a_seed(make):
    transform, image = make(), strokes()
    torch.manual_seed(3)
    first = transform(image)
    torch.manual_seed(3)
    assert torch.equal(transform(image), first)
    torch.manual_seed(4)
    assert not torch.equal(transform(image), first)


def test_identity_settings_give_the_image_back():
    image = torch.rand(2, 20, 20)
    assert torch.allclose(RandomAffine(0, 0, (1, 1), 0)(image), image, atol=1e-5)
    assert torch.allclose(ElasticDistortion(alpha=0.0)(image), image, atol=1e-5)
    assert torch.equal(RandomLowResolution(probability=0.0)(image), image)
    assert torch.equal(RandomLowResolution(probability=1.0, sizes=(20, 30))(image), image)


def test_a_coarse_scan_averages_blocks():
    # a 2 x 2 checkerboard at 16 px, scanned at 8 px: every block holds two inked pixels of
    # four, so the scan is 0.5 everywhere, and scaling a constant back up keeps it
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float()[None]
    out = RandomLowResolution(probability=1.0, sizes=(8, 8))(checker)
    torch.testing.assert_close(out, torch.full_like(checker, 0.5), atol=1e-5, rtol=0)
    # a bar 4 px wide at 16 px, scanned at 4 px: ink only in the bar's column of blocks
    bar = torch.zeros(1, 16, 16)
    bar[:, :, 4:8] = 1.0
    coarse = RandomLowResolution(probability=1.0, sizes=(4, 4))(bar)
    assert coarse[0, 8, 5] > 0.8 and coarse[0, 8, 14] < 0.1
    assert not torch.equal(coarse, bar)


def test_low_resolution_scans_about_its_share_of_a_batch():
    torch.manual_seed(0)
    images = torch.rand(400, 1, 12, 12)
    out = RandomLowResolution(probability=0.25, sizes=(4, 6))(images)
    scanned = sum(not torch.equal(a, b) for a, b in zip(out, images, strict=True))
    assert 70 <= scanned <= 130  # binomial(400, 0.25): 100 ± 8.7


def test_a_zoom_by_two_halves_the_slope_of_a_ramp():
    size = 16
    ramp = (torch.arange(size, dtype=torch.float32) / (size - 1)).expand(1, size, size)
    out = RandomAffine(degrees=0, shear=0, scale=(2, 2), translate=0)(ramp)
    # Output pixel j (centre x_j = (2j+1)/W - 1 in [-1, 1]) samples the input at x_j / 2, i.e. at
    # pixel coordinate ((x_j/2 + 1) W - 1) / 2; bilinear interpolation of a ramp is exact.
    x = (2 * torch.arange(size) + 1) / size - 1
    expected = (((x / 2 + 1) * size - 1) / 2) / (size - 1)
    torch.testing.assert_close(out[0], expected.expand(size, size), atol=1e-5, rtol=0)


def test_a_dilation_grows_each_stroke_by_its_radius():
    dot = torch.zeros(1, 11, 11)
    dot[0, 5, 5] = 0.6
    grown = RandomDilation(probability=1.0, radii=(2, 2))(dot)
    assert torch.equal(grown[0, 3:8, 3:8], torch.full((5, 5), 0.6))
    assert math.isclose(float(grown.sum()), 25 * 0.6, rel_tol=1e-6)
    cross = strokes()  # bar 1.0 at rows 12..15, stroke 0.7 at columns 13..14
    thick = RandomDilation(probability=1.0, radii=(1, 1))(cross)
    assert torch.equal(thick[0, 11:17, 3:-3], torch.ones(6, 22))  # the bar, a pixel wider each side
    assert torch.equal(thick[0, 3:10, 12:16], torch.full((7, 4), 0.7))  # the stroke above it
    assert thick[0, :, :3].max() == 0 and thick[0, :2].max() == 0  # nothing beyond one pixel
    for identity in (RandomDilation(probability=0.0), RandomDilation(1.0, radii=(0, 0))):
        assert torch.equal(identity(cross), cross)


def test_fit_to_frame_scales_the_ink_to_fill_the_frame_and_keeps_its_aspect():
    image = torch.zeros(1, 28, 28)
    image[0, 3:7, 15:23] = 1.0  # 4 high, 8 wide, off-centre
    fitted = RandomFitToFrame(probability=1.0, margin=2)(image)
    ink = fitted[0] > 0.5
    rows, cols = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
    # the longer side, 8, becomes 28 - 2 * 2 = 24: scale 3, so 12 x 24, centred
    assert (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])) == (8, 19, 2, 25)
    assert torch.allclose(fitted[0, 9:19, 3:25], torch.ones(10, 22), atol=1e-5)
    assert fitted.max() <= 1 and fitted[0, :7].max() == 0 and fitted[0, :, :2].max() == 0
    blank = torch.zeros(1, 28, 28)
    assert torch.equal(RandomFitToFrame(probability=1.0)(blank), blank)  # no ink: as it is
    assert torch.equal(RandomFitToFrame(probability=0.0)(image), image)
    torch.manual_seed(0)
    batch = image.expand(400, 1, 28, 28).clone()
    share = (RandomFitToFrame(probability=0.25)(batch) != batch).flatten(1).any(1).float().mean()
    assert 0.18 < share < 0.32


def test_inverse_maps_are_within_the_ranges():
    torch.manual_seed(0)
    maps = RandomAffine(degrees=20, shear=0, scale=(1, 1), translate=0.25).inverse_maps(500)
    linear, offset = maps[:, :, :2], maps[:, :, 2]
    # no shear, no scale: the inverse of a rotation, orthogonal, by at most 20 degrees
    torch.testing.assert_close(linear @ linear.transpose(1, 2), torch.eye(2).expand(500, 2, 2))
    angles = torch.atan2(linear[:, 0, 1], linear[:, 0, 0]).abs()
    assert angles.max() <= math.radians(20) + 1e-6 and angles.max() > math.radians(18)
    shifts = (linear.transpose(1, 2) @ -offset.unsqueeze(-1)).squeeze(-1)  # t = -M x offset
    assert shifts.abs().max() <= 2 * 0.25 + 1e-6 and shifts.abs().max() > 0.45
    scaled = RandomAffine(degrees=0, shear=0, scale=(0.5, 0.5), translate=0).inverse_maps(2)
    torch.testing.assert_close(scaled, torch.tensor([[2.0, 0, 0], [0, 2.0, 0]]).expand(2, 2, 3))


def test_fill_is_the_background_outside_the_image():
    black_on_white = 1.0 - strokes()
    out = RandomAffine(degrees=0, shear=0, scale=(0.5, 0.5), translate=0, fill=1.0)(black_on_white)
    assert torch.allclose(out[:, :3, :], torch.ones(1, 3, 28))  # shrunk: the border is fill
    assert out.min() < 0.5  # the strokes are still there


def test_elastic_field_is_smooth_and_scales_with_alpha():
    kernel = gaussian_kernel(1.0)
    assert len(kernel) == 7 and math.isclose(float(kernel.sum()), 1.0, rel_tol=1e-6)
    torch.testing.assert_close(kernel[4] / kernel[3], torch.tensor(math.exp(-0.5)))
    torch.manual_seed(0)
    weak = ElasticDistortion(alpha=1.0, sigma=4.0).displacements(64, 28, 28)
    torch.manual_seed(0)
    strong = ElasticDistortion(alpha=34.0, sigma=4.0).displacements(64, 28, 28)
    torch.testing.assert_close(strong, 34 * weak)
    # smoothing: neighbouring displacements nearly equal, far ones nearly independent
    centre = strong[..., 8:20, 8:20]
    near = torch.corrcoef(torch.stack([centre[..., :-1].flatten(), centre[..., 1:].flatten()]))
    assert near[0, 1] > 0.95
    assert 0.5 < float(centre.std()) < 3.0  # about 1.2 px at Simard et al.'s alpha=34, sigma=4


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RandomAffine(degrees=-1), "degrees must be a number in"),
        (lambda: RandomAffine(scale=(1.2, 0.8)), "scale must be"),
        (lambda: RandomAffine(translate=2), "translate must be"),
        (lambda: RandomAffine(fill=255), "fill must be"),
        (lambda: ElasticDistortion(sigma=0), "sigma must be a positive"),
        (lambda: ElasticDistortion(alpha=float("nan")), "alpha must be"),
        (lambda: RandomLowResolution(probability=1.5), "probability must be a number in"),
        (lambda: RandomLowResolution(sizes=(0, 4)), "sizes must be"),
        (lambda: RandomLowResolution(sizes=(8, 4)), "sizes must be"),
        (lambda: RandomLowResolution(sizes=(8.5, 9)), "sizes must be"),
        (lambda: RandomLowResolution()(torch.zeros(28, 28)), r"float images \[C, H, W\]"),
        (lambda: RandomDilation(radii=(2, 1)), "radii must be"),
        (lambda: RandomDilation(radii=(-1, 1)), "radii must be"),
        (lambda: RandomDilation(radii=(1.5, 2)), "radii must be"),
        (lambda: RandomDilation(probability=-0.1), "probability must be a number in"),
        (lambda: RandomFitToFrame(margin=-1), "margin must be whole pixels"),
        (lambda: RandomFitToFrame(threshold=1.0), "threshold must be a number in"),
        (lambda: RandomFitToFrame(margin=14)(torch.zeros(1, 28, 28)), "use a margin below 14"),
        (lambda: Compose(RandomAffine()), "transforms must be a list"),
        (lambda: Compose([1]), "not"),
        (lambda: RandomAffine()(torch.zeros(28, 28)), r"float images \[C, H, W\]"),
        (lambda: ElasticDistortion()(torch.zeros(1, 8, 8, dtype=torch.uint8)), "float images"),
    ],
)
def test_bad_arguments_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# -- seeded per image by ClassDataset: reproducible, whatever the workers ------------------------
def dataset(transform) -> ClassDataset:
    """4 classes of 5 images at 16 px (images 5c .. 5c+4 are class c)."""
    data = make_class_dataset(num_classes=4, per_class=5, size=16)
    data.transform = transform
    return data


def test_a_task_gets_the_same_views_and_leaves_the_global_generator_alone():
    data, plain = dataset(TRANSFORMS["both"]()), dataset(None)
    spec = TaskSpec(classes=(2, 0, 3), support=(10, 0, 15), query=(11, 1, 16))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = data[spec]
    assert torch.equal(torch.get_rng_state(), before)  # dropout etc. draw what they would have
    torch.rand(100)  # other random draws in between change nothing
    again = data[spec]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    unaugmented = plain[spec]
    assert not torch.allclose(first[0], unaugmented[0]) and torch.equal(first[1], unaugmented[1])
    # the same image in another task gets another view
    other = data[TaskSpec(classes=(2, 1, 3), support=(10, 5, 15), query=(11, 6, 16))]
    assert not torch.equal(other[0][0], first[0][0])
    assert torch.equal(plain[TaskSpec((2, 1), (10, 5), (11, 6))][0][0], unaugmented[0][0])


def test_view_seeds_differ_per_image_and_per_task():
    spec = TaskSpec(classes=(2, 0), support=(10, 0), query=(11, 1))
    seeds = view_seeds(spec).tolist()
    assert len(set(seeds)) == 4 and seeds == view_seeds(spec).tolist()
    assert view_seeds(TaskSpec(classes=(0, 2), support=(0, 10), query=(1, 11))).tolist() != seeds


def test_training_episodes_are_the_same_with_or_without_workers():
    batches = {}
    for workers in (0, 2):
        dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=4, steps_per_epoch=3,
                            num_workers=workers, train_transform=TRANSFORMS["both"]())  # fmt: skip
        dm.setup("fit")
        loader = dm.train_dataloader()
        batches[workers] = [b.support_x.clone() for b in loader]
        del loader  # shuts the persistent workers down
    for a, b in zip(batches[0], batches[2], strict=True):
        assert torch.equal(a, b)


def test_a_config_builds_the_transforms(tmp_path):
    config = {
        "model": {
            "class_path": "lightning_metakd.modules.MetaLearnerModule",
            "init_args": {
                "backbone": {"class_path": "lightning_metakd.models.Conv4",
                             "init_args": {"hidden": 4, "image_size": 8}},
                "algorithm": {"class_path": "lightning_metakd.algorithms.ProtoNet"},
                "ways": 3,
            },
        },
        "data": {
            "class_path": "conftest.TinyDataModule",
            "init_args": {
                "ways": 3,
                "queries": 2,
                "train_transform": {
                    "class_path": "lightning_metakd.data.augment.Compose",
                    "init_args": {"transforms": [
                        {"class_path": "lightning_metakd.data.augment.RandomAffine",
                         "init_args": {"degrees": 15, "scale": [0.8, 1.0], "fill": 0.0}},
                        {"class_path": "lightning_metakd.data.augment.ElasticDistortion",
                         "init_args": {"alpha": 8.0, "sigma": 3.0}},
                    ]},
                },
                "eval_transform": {"class_path": "lightning_metakd.data.augment.RandomAffine"},
            },
        },
        "trainer": {"logger": False, "default_root_dir": str(tmp_path)},
    }  # fmt: skip
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cli = run_lightning_cli(["--config", str(tmp_path / "config.yaml")], run=False)
    views = cli.datamodule.train_transform
    assert isinstance(views, Compose)
    affine, elastic = views.transforms
    assert isinstance(affine, RandomAffine) and isinstance(elastic, ElasticDistortion)
    assert (affine.degrees, affine.shear, affine.scale) == (15.0, 10.0, (0.8, 1.0))
    assert (elastic.alpha, elastic.sigma) == (8.0, 3.0)
    assert isinstance(cli.datamodule.eval_transform, RandomAffine)
    cli.datamodule.setup("fit")
    assert cli.datamodule.splits["train"].transform is views


def test_the_kanji_config_turns_the_views_on(tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs/kanji/distill_protonet_augmented.yaml"
    cli = run_lightning_cli(
        ["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False
    )
    views = cli.datamodule.train_transform
    assert [type(t).__name__ for t in views.transforms] == ["RandomAffine", "ElasticDistortion"]
    assert cli.datamodule.eval_transform is None


def test_the_handwriting_student_config_turns_on_its_recipe(tmp_path):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "configs/kanji/distill_protonet_handwriting.yaml"
    cli = run_lightning_cli(
        ["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False
    )
    views = cli.datamodule.train_transform
    assert isinstance(views, RandomLowResolution)
    assert (views.probability, views.sizes) == (0.5, (8, 16))
    assert cli.datamodule.eval_transform is None and cli.datamodule.render_style == "mixed"
    assert cli.model.hparams.teacher_normalization == "population"
    # Conv4-24: 1*24*9 + 3*24*24*9 conv weights, 4*24 biases, 4*2*24 BatchNorm affine
    assert sum(p.numel() for p in cli.model.student.parameters()) == 216 + 15552 + 96 + 192
    assert cli.trainer.max_epochs == 8


def test_stored_views_are_a_fixed_set_per_image_and_named_by_view_index():
    views = 3
    data = dataset(TRANSFORMS["both"]())
    data.views = views
    plain = dataset(None)
    shown: dict[int, dict[int, torch.Tensor]] = {}
    for t in range(40):  # the image 10 in many tasks: always one of its 3 views
        other = 5 + t % 5
        query = other + 1 if other < 9 else 5
        spec = TaskSpec(classes=(2, 1), support=(10, other), query=(11, query))
        support_x, _, query_x, _, _, support_index, query_index = data[spec]
        for x, i, sample in zip(support_x, support_index, spec.support, strict=True):
            base, view = divmod(int(i), views)
            assert base == sample and 0 <= view < views
            known = shown.setdefault(base, {})
            if view in known:
                assert torch.equal(known[view], x)  # the same view, whatever the task
            known[view] = x
        assert [int(i) // views for i in query_index] == list(spec.query)
    assert len(shown[10]) == views  # every view was drawn, and they are distinct images
    again = dataset(TRANSFORMS["both"]())  # a new process's dataset: nothing stored yet
    again.views = views
    for t in range(6):  # it makes the same views (the same seeds), not only keeps them
        spec = TaskSpec(classes=(2, 1), support=(10, 5 + t % 5), query=(11, 5 + (t + 1) % 5))
        support_x, *_, support_index, _ = again[spec]
        assert torch.equal(support_x[0], shown[10][int(support_index[0]) % views])
    first, second, third = (shown[10][k] for k in range(views))
    assert not torch.equal(first, second) and not torch.equal(second, third)
    unaugmented = plain[TaskSpec(classes=(2, 1), support=(10, 5), query=(11, 6))][0][0]
    assert all(not torch.allclose(x, unaugmented) for x in shown[10].values())
    # without views (or without a transform) indices stay sample indices
    assert plain[TaskSpec((2, 1), (10, 5), (11, 6))][5].tolist() == [10, 5]
    plain.views = views  # views without a transform change nothing
    assert plain[TaskSpec((2, 1), (10, 5), (11, 6))][5].tolist() == [10, 5]


def test_a_stored_view_depends_on_the_image_and_view_alone():
    assert fixed_view_seed(10, 3) == fixed_view_seed(10, 3)
    seeds = {fixed_view_seed(i, k) for i in range(20) for k in range(4)}
    assert len(seeds) == 80


def test_train_views_reach_the_training_split_and_bad_values_are_clear_errors():
    dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=2,
                        train_transform=TRANSFORMS["affine"](), train_views=2)  # fmt: skip
    dm.setup("fit")
    assert dm.splits["train"].views == 2 and dm.splits["val"].views is None
    episode = next(iter(dm.train_dataloader()))
    assert int(episode.support_index.max()) < 2 * len(dm.splits["train"])
    with pytest.raises(ValueError, match="train_views must be at least 1"):
        TinyDataModule(train_views=0)
    with pytest.raises(ValueError, match="no train_transform.*remove train_views"):
        TinyDataModule(train_views=2).setup("fit")
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="views must be at least 1"):
        ClassDataset(images, [0, 0, 1, 1], ["a", "b"], views=0)


def test_stored_views_past_the_memory_budget_are_made_again_alike():
    data = dataset(TRANSFORMS["both"]())
    data.views = 2
    spec = TaskSpec(classes=(2, 1), support=(10, 5), query=(11, 6))
    kept = data[spec]
    assert len(data._views_made.made) == 4 and data._views_made.size == 4 * 16 * 16 * 4
    tight = dataset(TRANSFORMS["both"]())
    tight.views, tight.stored_views_bytes = 2, 16 * 16 * 4  # room for one view
    for _ in range(2):
        again = tight[spec]
        for a, b in zip(kept, again, strict=True):
            assert torch.equal(a, b)
    assert len(tight._views_made.made) == 1
