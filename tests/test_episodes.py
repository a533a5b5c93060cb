"""The episodic data layer: Episode, ClassDataset, EpisodeSampler, EpisodicDataModule."""

from __future__ import annotations

import pickle
from collections import Counter

import pytest
import torch
from conftest import TinyDataModule, make_class_dataset

from lightning_metakd.data import ClassDataset, Episode, EpisodeSampler, TaskSpec


def test_episode_shapes_and_label_remapping(tiny_datamodule):
    episode = next(iter(tiny_datamodule.train_dataloader()))
    assert isinstance(episode, Episode)
    assert episode.support_x.shape == (4, 3 * 2, 1, 8, 8)
    assert episode.query_x.shape == (4, 3 * 2, 1, 8, 8)
    assert (episode.num_tasks, episode.ways, episode.shots, episode.queries) == (4, 3, 2, 2)
    expected = torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.equal(episode.support_y, expected.expand(4, -1))
    assert torch.equal(episode.query_y, expected.expand(4, -1))
    ds = tiny_datamodule.splits["train"]
    # Label j of task t is class classes[t, j]: the pixels (mean brightness encodes the class) agree.
    for t in range(4):
        for j in range(3):
            c = int(episode.classes[t, j])
            images = episode.support_x[t, episode.support_y[t] == j]
            reference = torch.stack([ds.load_image(i) for i in ds.indices_by_class[c]])
            assert (
                images.mean(0) - reference.mean(0)
            ).abs().mean() < 0.2  # the template shows through
        assert len(set(episode.classes[t].tolist())) == 3


def test_support_and_query_never_share_a_sample(tiny_datamodule):
    sampler = tiny_datamodule.sampler("train")
    for spec in sampler:
        assert not set(spec.support) & set(spec.query)
        ds = tiny_datamodule.splits["train"]
        for j, c in enumerate(spec.classes):
            members = set(ds.indices_by_class[c].tolist())
            assert set(spec.support[j * spec.shots : (j + 1) * spec.shots]) <= members
            assert set(spec.query[j * spec.queries : (j + 1) * spec.queries]) <= members


def test_episode_to_split_task_and_pickle(tiny_episode):
    ep = tiny_episode.to("cpu", dtype=torch.float64)
    assert ep.support_x.dtype == torch.float64 and ep.support_y.dtype == torch.long
    assert tiny_episode.task(2).support_x.shape[0] == 1
    assert torch.equal(tiny_episode.task(2).query_y[0], tiny_episode.query_y[2])
    chunks = tiny_episode.split(3)
    assert [len(c) for c in chunks] == [3, 1]
    assert torch.equal(torch.cat([c.support_x for c in chunks]), tiny_episode.support_x)
    restored = pickle.loads(pickle.dumps(tiny_episode))
    assert torch.equal(restored.query_x, tiny_episode.query_x)


def test_episode_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[tasks, samples, C, H, W\]"):
        Episode(
            torch.zeros(2, 3, 8, 8),
            torch.zeros(2, 3),
            torch.zeros(2, 3, 8, 8),
            torch.zeros(2, 3),
            torch.zeros(2, 3),
        )


def test_eval_episodes_are_fixed_and_reproducible():
    def test_specs():
        dm = TinyDataModule(ways=3, shots=1, queries=2, test_episodes=10, seed=7)
        dm.setup()
        return list(dm.sampler("test")), [e.query_x for e in dm.test_dataloader()]

    specs_a, batches_a = test_specs()
    specs_b, batches_b = test_specs()
    assert specs_a == specs_b and len(specs_a) == 10
    assert all(torch.equal(a, b) for a, b in zip(batches_a, batches_b, strict=True))
    dm = TinyDataModule(ways=3, shots=1, queries=2, test_episodes=10, seed=7)
    dm.setup()
    sampler = dm.sampler("test")
    first = list(sampler)
    sampler.set_epoch(5)
    assert list(sampler) == first  # evaluation ignores the epoch


def test_training_episodes_change_with_epoch_and_seed():
    dm = TinyDataModule(ways=3, shots=1, queries=2, steps_per_epoch=5, meta_batch_size=2, seed=1)
    dm.setup()
    sampler = dm.sampler("train")
    epoch0 = list(sampler)
    assert list(sampler) == epoch0  # same epoch, same tasks (resumable)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    other = TinyDataModule(ways=3, shots=1, queries=2, steps_per_epoch=5, meta_batch_size=2, seed=2)
    other.setup()
    assert list(other.sampler("train")) != epoch0


def test_val_and_test_lists_differ():
    dm = TinyDataModule(classes=(12, 8, 8), ways=3, shots=1, queries=2)
    dm.setup()
    assert list(dm.sampler("val"))[:5] != list(dm.sampler("test"))[:5]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("fixed", [True, False])
def test_ddp_shards_cover_every_task_exactly_once(world, fixed):
    ds = make_class_dataset(10, 6)
    num_tasks = 12 if not fixed else 10  # evaluation lists need not divide evenly
    if not fixed and num_tasks % world:
        num_tasks = world * 4

    def sampler(rank: int, replicas: int) -> EpisodeSampler:
        s = EpisodeSampler(
            ds, 3, 1, 2, num_tasks, fixed=fixed, seed=3, num_replicas=replicas, rank=rank
        )
        s.set_epoch(2)
        return s

    single = list(sampler(0, 1))
    shards = [list(sampler(r, world)) for r in range(world)]
    assert sum(len(s) for s in shards) == len(single) == num_tasks
    assert [len(sampler(r, world)) for r in range(world)] == [len(s) for s in shards]
    assert Counter(t for s in shards for t in s) == Counter(single)
    if not fixed:
        # Batch b of every rank together is global batch b: DDP steps equal one-process steps.
        per_rank = 4 // world if 4 % world == 0 else None
        if per_rank:
            for b in range(num_tasks // 4):
                merged = {t for s in shards for t in s[b * per_rank : (b + 1) * per_rank]}
                assert merged == set(single[b * 4 : (b + 1) * 4])


def test_training_tasks_must_divide_over_ranks():
    ds = make_class_dataset(10, 6)
    with pytest.raises(ValueError, match="meta_batch_size a multiple"):
        EpisodeSampler(ds, 3, 1, 2, num_tasks=10, num_replicas=3, rank=0)


def test_datamodule_shards_batches_for_ddp(monkeypatch):
    dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=4, steps_per_epoch=3)
    dm.setup()
    monkeypatch.setattr(dm, "_world", lambda: (2, 1))
    loader = dm.train_dataloader()
    assert loader.batch_size == 2 and len(loader) == 3
    monkeypatch.setattr(dm, "_world", lambda: (3, 0))
    with pytest.warns(UserWarning, match="averages 6 tasks.*multiple of 3"):
        loader = dm.train_dataloader()
    assert loader.batch_size == 2 and len(loader) == 3  # ceil(4 / 3) tasks per process


def test_meta_batch_of_one_runs_on_any_number_of_processes(monkeypatch):
    """A ProtoNet config's meta_batch_size 1 on 2 processes: one task each, nothing dropped."""
    dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=1, steps_per_epoch=4)
    dm.setup()
    single = [episode.classes.tolist() for episode in dm.train_dataloader()]
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(dm, "_world", lambda rank=rank: (2, rank))
        dm._warned_meta_batch = False
        with pytest.warns(UserWarning, match="meta_batch_size=1 does not divide over 2"):
            shards.append([episode.classes.tolist() for episode in dm.train_dataloader()])
    assert [len(s) for s in shards] == [4, 4]  # steps per epoch kept, one task per process
    assert all(len(batch) == 1 for s in shards for batch in s)
    assert shards[0] != shards[1]  # the processes train on different tasks
    assert shards[0][0] == single[0]  # rank 0 starts with the single process's first task


def test_splits_must_be_disjoint():
    class Overlapping(TinyDataModule):
        def build_splits(self):
            splits = super().build_splits()
            splits["test"] = make_class_dataset(8, 6, 8, prefix="train")
            return splits

    with pytest.raises(ValueError, match="train and test splits share 8 class.*Keep each class"):
        Overlapping(ways=3, shots=1, queries=2).setup()


def test_different_test_shape():
    dm = TinyDataModule(
        ways=3, shots=2, queries=2, test_ways=5, test_shots=1, test_queries=3, meta_batch_size=2
    )
    dm.setup()
    train = next(iter(dm.train_dataloader()))
    test = next(iter(dm.test_dataloader()))
    assert (train.ways, train.shots, train.queries) == (3, 2, 2)
    assert (test.ways, test.shots, test.queries) == (5, 1, 3)


def test_grouped_episodes_stay_inside_one_group():
    dm = TinyDataModule(ways=3, shots=1, queries=2, groups=2, grouping="group", classes=(12, 8, 8))
    dm.setup()
    ds = dm.splits["train"]
    group_of = {c: g for g, members in ds.groups.items() for c in members}
    for spec in dm.sampler("train"):
        assert len({group_of[c] for c in spec.classes}) == 1


def test_rotations_add_classes():
    dm = TinyDataModule(ways=3, shots=1, queries=2, rotations=True)
    dm.setup()
    ds = dm.splits["train"]
    assert ds.num_classes == 12 * 4 and len(ds) == 12 * 6 * 4
    image = ds.load_image(0)
    assert torch.allclose(ds.load_image(1), torch.rot90(image, 1, dims=(1, 2)))
    assert ds.class_names[:2] == ["train0", "train0@rot90"]
    assert dm.splits["test"].num_classes == 8  # rotations only enlarge the training classes


def test_too_many_ways_names_the_split_and_the_setting():
    with pytest.raises(ValueError) as err:
        TinyDataModule(ways=3, test_ways=9, shots=1, queries=2).setup()
    assert str(err.value) == (
        "A task needs 9 ways but the val split has only 8 classes. Lower test_ways to at most 8, "
        "or give the val split more classes."
    )
    with pytest.raises(ValueError) as err:
        TinyDataModule(ways=13, test_ways=3, shots=1, queries=2).setup()
    assert str(err.value) == (
        "A task needs 13 ways but the train split has only 12 classes. Lower ways to at most 12, "
        "or give the train split more classes."
    )
    with pytest.raises(ValueError) as err:
        TinyDataModule(ways=7, shots=1, queries=2, groups=2, grouping="group").setup()
    assert str(err.value) == (
        "No group in the train split has 7 classes (the largest has 6); lower ways to at most 6, "
        "or use grouping='none'."
    )


def test_too_few_images_names_the_class_and_the_split():
    with pytest.raises(ValueError) as err:
        TinyDataModule(ways=3, shots=5, queries=2).setup()
    assert str(err.value) == (
        "Class 'train0' of the train split has 6 images, but a task needs shots + queries = 5 + 2 "
        "= 7 per class (12 class(es) are short). Lower shots or queries, or remove small classes."
    )
    with pytest.raises(ValueError, match=r"of the val split .* Lower test_shots or test_queries"):
        TinyDataModule(ways=3, shots=1, queries=2, test_shots=5).setup()


def test_a_sampler_without_a_split_name_names_both_settings():
    dataset = make_class_dataset(num_classes=4)
    with pytest.raises(ValueError) as err:
        EpisodeSampler(dataset, ways=5, shots=1, queries=1, num_tasks=1)
    assert str(err.value) == (
        "A task needs 5 ways but this split has only 4 classes. Lower ways (or test_ways) to at "
        "most 4, or give this split more classes."
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ways": 0}, "ways must be at least 1"),
        ({"queries": 0}, "queries must be at least 1"),
        ({"meta_batch_size": 0}, "meta_batch_size must be at least 1"),
        ({"grouping": "alphabet"}, "grouping must be 'none' or 'group'"),
        ({"num_workers": -1}, "num_workers must be non-negative"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TinyDataModule(**kwargs)


def test_data_before_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"Call TinyDataModule.setup\(\)"):
        TinyDataModule().train_dataloader()


def test_class_dataset_rejects_plain_indices_and_bad_images():
    ds = make_class_dataset(4, 3)
    with pytest.raises(TypeError, match="indexed by a TaskSpec"):
        ds[0]
    with pytest.raises(ValueError, match="must be uint8"):
        ClassDataset(torch.zeros(3, 1, 4, 4), [0, 0, 0], ["a"])
    with pytest.raises(ValueError, match="3 images but 2 labels; give one label per image"):
        ClassDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), [0, 0], ["a"])
    with pytest.raises(ValueError) as err:
        ClassDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), [0, 2], ["a", "b"])
    assert str(err.value) == (
        "labels must lie in 0..1 (one class name each), got 0..2; give a name for every class."
    )


def test_unreadable_image_file_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = ClassDataset([str(bad), str(bad)], [0, 0], ["a"])
    with pytest.raises(OSError, match="broken.png"):
        ds[TaskSpec((0,), (0,), (1,))]


def test_workers_give_the_same_episodes():
    def batches(workers: int):
        dm = TinyDataModule(
            ways=3, shots=1, queries=2, test_episodes=8, meta_batch_size=4, num_workers=workers
        )
        dm.setup()
        return [e.support_x for e in dm.test_dataloader()]

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(2), strict=True))
