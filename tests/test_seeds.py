"""Seeds: ``train_seed`` varies the training episodes alone; `metakd sweep` runs a config once per
seed and aggregates mean ± sd; paired differences of two configs over the same test episodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TinyDataModule

from lightning_metakd.data import FolderDataModule

TESTS = Path(__file__).resolve().parent
SHAPE = {"ways": 3, "shots": 1, "queries": 2, "meta_batch_size": 2, "steps_per_epoch": 3,
         "val_episodes": 4, "test_episodes": 6}  # fmt: skip


def tasks(dm, split: str) -> list:
    return list(dm.sampler(split).global_tasks())


def first_batch(dm, split: str = "train"):
    return next(iter(dm.dataloader(split)))


# -- train_seed --------------------------------------------------------------------------------------
def test_train_seed_changes_training_episodes_only():
    base = TinyDataModule(seed=0, **SHAPE)
    other = TinyDataModule(seed=0, train_seed=1, **SHAPE)
    for dm in (base, other):
        dm.setup("fit")
    assert tasks(base, "train") != tasks(other, "train")
    assert tasks(base, "val") == tasks(other, "val")
    assert tasks(base, "test") == tasks(other, "test")
    # The training stream of train_seed=1 is the one seed=1 draws; the default is seed's own.
    reference = TinyDataModule(seed=1, **SHAPE)
    reference.setup("fit")
    assert tasks(other, "train") == tasks(reference, "train")
    default = TinyDataModule(seed=0, train_seed=0, **SHAPE)
    default.setup("fit")
    assert base.train_seed == 0
    assert torch.equal(first_batch(base).support_x, first_batch(default).support_x)
    assert torch.equal(first_batch(base, "test").query_x, first_batch(other, "test").query_x)


def test_train_seed_keeps_a_seeded_class_split(tmp_path):
    from test_real_data import make_class_tree

    make_class_tree(tmp_path, [f"class{i:02d}" for i in range(12)], per_class=3)
    kwargs = {"image_size": 8, "ways": 2, "shots": 1, "queries": 1, "val_episodes": 2,
              "test_episodes": 2, "split_fractions": (0.5, 0.25, 0.25)}  # fmt: skip
    variants = {"seed 0": {}, "train_seed 5": {"train_seed": 5}, "seed 5": {"seed": 5}}
    split = {}
    for name, extra in variants.items():
        dm = FolderDataModule(tmp_path, **kwargs, **extra)
        dm.setup("fit")
        split[name] = {s: dm.splits[s].base_class_names for s in ("train", "val", "test")}
    assert split["seed 0"] == split["train_seed 5"]
    assert split["seed 0"] != split["seed 5"]


def test_train_seed_reaches_learn2learn_taskset_training_keys():
    pytest.importorskip("learn2learn")
    import learn2learn as l2l
    from test_learn2learn_adapter import SPLIT_CLASSES, TASK, make_taskset, tagged_tensors
    from torch.utils.data import TensorDataset

    from lightning_metakd.data import Learn2LearnDataModule

    full = l2l.data.MetaDataset(TensorDataset(*tagged_tensors(range(16))))
    splits = [l2l.data.FilteredMetaDataset(full, list(SPLIT_CLASSES[s])) for s in SPLIT_CLASSES]
    keys = {}
    for train_seed in (None, 3):
        dm = Learn2LearnDataModule(*(make_taskset(l2l, m) for m in splits), seed=7,
                                   train_seed=train_seed, **TASK)  # fmt: skip
        dm.setup()
        keys[train_seed] = {s: list(dm.sampler(s)) for s in ("train", "val", "test")}
    assert {k.seed for k in keys[None]["train"]} == {7}
    assert {k.seed for k in keys[3]["train"]} == {3}
    assert keys[None]["val"] == keys[3]["val"] and keys[None]["test"] == keys[3]["test"]
