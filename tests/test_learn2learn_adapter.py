"""Learn2LearnDataModule: learn2learn MetaDatasets, plain datasets and Tasksets as episode sources.

Data is built in memory (no downloads). Pixel (0, 0) of every image holds its original class label
and pixel (0, 1) its index in the full data set, so tests can read back which class and which
sample ended up under each task label.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from lightning_metakd.data import Episode, Learn2LearnDataModule
from lightning_metakd.data.learn2learn import TaskKey, TaskKeySampler

SPLIT_CLASSES = {"train": range(0, 8), "val": range(8, 12), "test": range(12, 16)}
PER_CLASS = 6
TASK = {"ways": 3, "shots": 2, "queries": 3, "meta_batch_size": 4, "image_size": 8}
TASK.update(steps_per_epoch=2, val_episodes=6, test_episodes=8)


@pytest.fixture(scope="module")
def l2l():
    return pytest.importorskip("learn2learn")


def tagged_tensors(
    classes: range | list[int], first_index: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``[n, 1, 8, 8]`` whose pixel (0, 0) is the class and (0, 1) the sample index."""
    labels = torch.tensor(list(classes)).repeat_interleave(PER_CLASS)
    g = torch.Generator().manual_seed(len(labels) + first_index)
    images = torch.randint(0, 256, (len(labels), 1, 8, 8), generator=g, dtype=torch.uint8)
    images[:, 0, 0, 0] = labels.to(torch.uint8)
    images[:, 0, 0, 1] = torch.arange(first_index, first_index + len(labels), dtype=torch.uint8)
    return images, labels


@pytest.fixture(scope="module")
def full(l2l):
    """One MetaDataset over 16 classes x 6 images; the splits filter it by class."""
    images, labels = tagged_tensors(range(16))
    return l2l.data.MetaDataset(TensorDataset(images, labels))


@pytest.fixture(scope="module")
def filtered(l2l, full):
    return {s: l2l.data.FilteredMetaDataset(full, list(c)) for s, c in SPLIT_CLASSES.items()}


def make_taskset(l2l, meta, ways=3, k=5, on=None):
    on = meta if on is None else on
    transforms = [
        l2l.data.transforms.NWays(on, ways),
        l2l.data.transforms.KShots(on, k),
        l2l.data.transforms.LoadData(on),
        l2l.data.transforms.RemapLabels(on),
    ]
    return l2l.data.Taskset(meta, transforms)


def tag(x: torch.Tensor, pixel: int) -> torch.Tensor:
    """The tag stored in ``pixel`` of each image of ``x`` (``[..., 1, H, W]`` floats in [0, 1])."""
    return (x[..., 0, 0, pixel] * 255).round().long()


def check_episode(ep: Episode, dm: Learn2LearnDataModule, split: str) -> None:
    """Shapes, class-major labels, and that label j of task t shows exactly class classes[t, j]."""
    n, k, q = TASK["ways"], TASK["shots"], TASK["queries"]
    assert ep.support_x.shape[1:] == (n * k, 1, 8, 8) and ep.query_x.shape[1:] == (n * q, 1, 8, 8)
    assert ep.support_x.dtype == torch.float32
    assert torch.equal(ep.support_y, torch.arange(n).repeat_interleave(k).expand(len(ep), -1))
    assert torch.equal(ep.query_y, torch.arange(n).repeat_interleave(q).expand(len(ep), -1))
    names = dm.splits[split].class_names
    for t in range(len(ep)):
        expected = torch.tensor([int(names[c].split(":")[-1]) for c in ep.classes[t]])
        assert torch.equal(tag(ep.support_x[t], 0), expected.repeat_interleave(k))
        assert torch.equal(tag(ep.query_x[t], 0), expected.repeat_interleave(q))
        samples = torch.cat([tag(ep.support_x[t], 1), tag(ep.query_x[t], 1)])
        assert len(set(samples.tolist())) == n * (k + q), "a sample is both support and query"
        assert len(set(expected.tolist())) == n


def all_episodes(dm: Learn2LearnDataModule, split: str) -> list[Episode]:
    return list(dm.dataloader(split))


def classes_seen(dm: Learn2LearnDataModule, split: str) -> set[str]:
    names = dm.splits[split].class_names
    return {names[c] for ep in all_episodes(dm, split) for c in ep.classes.flatten().tolist()}


# --------------------------------------------------------------------------------------------------
# Without learn2learn


def test_learn2learn_is_installed_when_ci_requires_it():
    if os.environ.get("METAKD_REQUIRE_LEARN2LEARN") != "1":
        pytest.skip("METAKD_REQUIRE_LEARN2LEARN is not set to 1")
    try:
        import learn2learn  # noqa: F401
    except ImportError as err:
        pytest.fail(
            f"METAKD_REQUIRE_LEARN2LEARN=1 but learn2learn does not import ({err}); run "
            "`python scripts/install_learn2learn.py`."
        )


def test_missing_learn2learn_raises_import_error_with_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # makes `import learn2learn` fail
    images, labels = tagged_tensors(range(4))
    data = TensorDataset(images, labels)
    with pytest.raises(ImportError) as info:
        Learn2LearnDataModule(data, data, data)
    message = str(info.value)
    assert "python scripts/install_learn2learn.py" in message
    assert "pip install lightning-metakd[learn2learn]" in message
    assert "Python < 3.11" in message


def test_importing_the_package_does_not_import_learn2learn():
    code = (
        "import sys, lightning_metakd, lightning_metakd.data as d; d.Learn2LearnDataModule; "
        "print(sorted(m for m in ('learn2learn', 'gym') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# MetaDataset splits: our sampler draws the tasks


def test_metadataset_splits_give_episodes_with_remapped_labels(filtered):
    dm = Learn2LearnDataModule(filtered["train"], filtered["val"], filtered["test"], **TASK)
    dm.setup()
    assert dm.splits["train"].class_names == [str(c) for c in SPLIT_CLASSES["train"]]
    assert dm.splits["train"].images.dtype == torch.uint8  # small: kept in memory
    for split in ("train", "val", "test"):
        episodes = all_episodes(dm, split)
        assert sum(len(ep) for ep in episodes) == {"train": 8, "val": 6, "test": 8}[split]
        for ep in episodes:
            check_episode(ep, dm, split)


def test_every_task_keeps_to_its_split_classes(filtered):
    dm = Learn2LearnDataModule(filtered["train"], filtered["val"], filtered["test"], **TASK)
    dm.setup()
    seen = {s: classes_seen(dm, s) for s in ("train", "val", "test")}
    for split, classes in SPLIT_CLASSES.items():
        assert seen[split] <= {str(c) for c in classes}
    assert not (
        seen["train"] & seen["val"] or seen["train"] & seen["test"] or seen["val"] & seen["test"]
    )


def test_overlapping_filtered_splits_are_refused(l2l, full):
    train = l2l.data.FilteredMetaDataset(full, list(range(0, 9)))  # class 8 is also in val
    val = l2l.data.FilteredMetaDataset(full, list(range(8, 12)))
    test = l2l.data.FilteredMetaDataset(full, list(range(12, 16)))
    dm = Learn2LearnDataModule(train, val, test, **TASK)
    with pytest.raises(ValueError, match="train and val splits share 1 class"):
        dm.setup()


def test_validation_and_test_episodes_are_fixed_and_reproducible(filtered):
    def build():
        dm = Learn2LearnDataModule(
            filtered["train"], filtered["val"], filtered["test"], seed=3, **TASK
        )
        dm.setup()
        return dm

    a, b = build(), build()
    for split in ("val", "test"):
        first, again, other = all_episodes(a, split), all_episodes(a, split), all_episodes(b, split)
        for x, y, z in zip(first, again, other, strict=True):
            assert torch.equal(x.support_x, y.support_x) and torch.equal(x.support_x, z.support_x)
            assert torch.equal(x.classes, z.classes) and torch.equal(x.query_x, z.query_x)
    sampler = a.sampler("train")
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0


def test_plain_datasets_are_wrapped_and_named_per_split(l2l):
    # Separate datasets whose labels restart at 0 (like MiniImagenet(mode=...)): distinct classes.
    sources = [
        TensorDataset(*tagged_tensors(range(n), first_index=i * 100))
        for i, n in enumerate((6, 4, 4))
    ]
    dm = Learn2LearnDataModule(*sources, **TASK)
    dm.setup()
    assert dm.splits["val"].class_names == ["val:0", "val:1", "val:2", "val:3"]
    check_episode(next(iter(dm.val_dataloader())), dm, "val")


def test_lazy_storage_matches_memory_storage(filtered):
    kwargs = {**TASK, "seed": 5}
    memory = Learn2LearnDataModule(*filtered.values(), storage="memory", **kwargs)
    lazy = Learn2LearnDataModule(*filtered.values(), storage="lazy", **kwargs)
    memory.setup()
    lazy.setup()
    assert not isinstance(lazy.splits["train"].images, torch.Tensor)
    for x, y in zip(all_episodes(memory, "test"), all_episodes(lazy, "test"), strict=True):
        assert torch.allclose(x.support_x, y.support_x) and torch.allclose(x.query_x, y.query_x)
        assert torch.equal(x.classes, y.classes)


class _FloatImages(Dataset):
    """Float images in [0, 255] (the scale of learn2learn's MiniImagenet items)."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, scale: float = 1.0, shift: float = 0.0
    ):
        self.images, self.labels, self.scale, self.shift = images, labels, scale, shift

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i].float() * self.scale + self.shift, int(self.labels[i])


def test_float_items_are_scaled_and_normalised_items_refused(l2l):
    images, labels = tagged_tensors(range(4))
    dm = Learn2LearnDataModule(*[_FloatImages(images, labels)] * 3, shared_labels=False, **TASK)
    dm.setup()
    assert torch.equal(dm.splits["train"].images, images)  # [0, 255] floats back to the same bytes
    normalised = _FloatImages(images, labels, scale=1 / 255, shift=-0.5)
    dm = Learn2LearnDataModule(normalised, normalised, normalised, shared_labels=False, **TASK)
    with pytest.raises(ValueError, match="Remove Normalize"):
        dm.setup()


def test_rotations_with_a_taskset_train_split_are_refused(l2l, filtered):
    taskset = make_taskset(l2l, filtered["train"])
    with pytest.raises(ValueError, match="RandomClassRotation"):
        Learn2LearnDataModule(taskset, filtered["val"], filtered["test"], rotations=True, **TASK)


# --------------------------------------------------------------------------------------------------
# Taskset splits: the taskset's own task descriptions, seeded by our keys


def test_taskset_splits_give_episodes_in_episode_form(l2l, filtered):
    tasksets = {s: make_taskset(l2l, m) for s, m in filtered.items()}
    dm = Learn2LearnDataModule(tasksets["train"], tasksets["val"], filtered["test"], **TASK)
    dm.setup()
    assert isinstance(dm.sampler("val"), TaskKeySampler)
    for split in ("train", "val", "test"):
        for ep in all_episodes(dm, split):
            check_episode(ep, dm, split)
    seen = {s: classes_seen(dm, s) for s in ("train", "val", "test")}
    for split, classes in SPLIT_CLASSES.items():
        assert seen[split] <= {str(c) for c in classes}


def test_taskset_episodes_are_deterministic_and_leave_global_rngs_alone(l2l, filtered):
    def build():
        tasksets = [make_taskset(l2l, filtered[s]) for s in ("train", "val", "test")]
        dm = Learn2LearnDataModule(*tasksets, seed=7, **TASK)
        dm.setup()
        return dm

    a, b = build(), build()
    val_a, val_a_again, val_b = (
        all_episodes(a, "val"),
        all_episodes(a, "val"),
        all_episodes(b, "val"),
    )
    for x, y, z in zip(val_a, val_a_again, val_b, strict=True):
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.support_x, z.support_x)
        assert torch.equal(x.classes, z.classes)
    random.seed(123)
    torch.manual_seed(123)
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    tasks = a._taskset_tasks("val")
    loaded = [tasks[key] for key in a.sampler("val")]  # (the DataLoader itself draws a torch seed)
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    assert torch.equal(torch.stack([t[0] for t in loaded[:4]]), val_a[0].support_x)
    train = a.sampler("train")
    epoch0 = [a._taskset_tasks("train")[k][4] for k in train]
    train.set_epoch(1)
    epoch1 = [a._taskset_tasks("train")[k][4] for k in train]
    assert any(not torch.equal(x, y) for x, y in zip(epoch0, epoch1, strict=True))


def test_taskset_keys_shard_over_ranks_without_loss_or_duplicates():
    whole = list(TaskKeySampler(10, fixed=True, seed=0, stream=1))
    shards = [
        list(TaskKeySampler(10, fixed=True, seed=0, stream=1, num_replicas=3, rank=r))
        for r in range(3)
    ]
    assert sorted(k for shard in shards for k in shard) == whole
    assert shards[1] == whole[1::3] and whole[0] == TaskKey(0, 1, -1, 0)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        TaskKeySampler(10, fixed=False, seed=0, stream=0, num_replicas=3)


def test_taskset_with_the_wrong_task_shape_fails_at_setup(l2l, filtered):
    wrong = make_taskset(l2l, filtered["val"], k=4)  # shots + queries = 5
    dm = Learn2LearnDataModule(filtered["train"], wrong, filtered["test"], **TASK)
    with pytest.raises(ValueError, match=r"KShots\(k=5\)"):
        dm.setup()


def test_taskset_drawing_classes_outside_its_split_is_caught(l2l, full, filtered):
    # Transforms built on the full dataset (as learn2learn's omniglot benchmark does) draw val
    # tasks from every class.
    leaky = make_taskset(l2l, filtered["val"], on=full)
    dm = Learn2LearnDataModule(
        filtered["train"],
        leaky,
        filtered["test"],
        val_episodes=20,
        **{k: v for k, v in TASK.items() if k != "val_episodes"},
    )
    with pytest.raises(ValueError, match="not in that split's dataset"):
        dm.setup()
        all_episodes(dm, "val")


def test_taskset_images_arrive_as_floats_in_unit_range(l2l, filtered):
    dm = Learn2LearnDataModule(
        *[make_taskset(l2l, filtered[s]) for s in ("train", "val", "test")], **TASK
    )
    dm.setup()
    x = next(iter(dm.test_dataloader())).support_x
    assert x.dtype == torch.float32 and x.min() >= 0.0 and x.max() <= 1.0
    raw = filtered["test"].dataset.dataset.tensors[0]  # the uint8 images behind the filter
    assert np.isin(tag(x, 1).flatten().numpy(), np.arange(len(raw))).all()
