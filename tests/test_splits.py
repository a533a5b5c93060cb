"""Absent val/test splits (zero split fractions), and the split summary printed at setup."""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TinyDataModule
from test_real_data import SMALL, SMALL_EVAL, make_alphabets, make_class_tree

from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.data import FolderDataModule, OmniglotDataModule
from lightning_metakd.data import datamodule as datamodule_module
from lightning_metakd.data.folder import check_fractions, seeded_split
from lightning_metakd.lightning_cli import run_lightning_cli
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

NO_VAL = (
    "Validation is off: TrainOnly has no val split (a zero val fraction in split_fractions, e.g. "
    "(1, 0, 0), gives it no classes). Lightning skips validation, so no val/acc is logged; with "
    "metakd fit, add --trainer.limit_val_batches 0 --checkpoint.monitor null to skip it without "
    "warnings (best.ckpt is then the latest)."
)


class TrainOnly(TinyDataModule):
    """Tiny in-memory data whose source has classes for the train split only."""

    def build_splits(self):
        return {"train": super().build_splits()["train"]}


# --- fractions


def test_zero_fractions_leave_a_split_empty():
    items = list(range(10))
    assert seeded_split(items, (1, 0, 0), seed=0) == (items, [], [])
    train, val, test = seeded_split(items, (0.8, 0, 0.2), seed=0)
    assert (len(train), len(val), len(test)) == (8, 0, 2)
    assert seeded_split([1], (1, 0, 0), seed=0) == ([1], [], [])
    assert seeded_split([1, 2], (0.5, 0, 0.5), seed=0)[1] == []


def test_too_few_items_for_the_fractions_says_how_many_are_needed():
    with pytest.raises(ValueError) as err:
        seeded_split([1, 2], (0.7, 0.1, 0.2), seed=0)
    assert str(err.value) == (
        "Cannot split 2 class folders into non-empty train/val/test parts with split_fractions="
        "(0.7, 0.1, 0.2): at least 3 are needed. Add class folders, give the tree train/ val/ "
        "test/ sub-folders, or set split_fractions to (1, 0, 0) to meta-train on every class "
        "without validation or test."
    )
    with pytest.raises(ValueError, match="into non-empty train/test parts .* at least 2 are"):
        seeded_split([1], (0.8, 0, 0.2), seed=0)


def test_fractions_need_a_training_part():
    with pytest.raises(ValueError) as err:
        check_fractions((0, 0.5, 0.5))
    assert str(err.value) == (
        "split_fractions must be three non-negative numbers (train, val, test) that sum to 1, with "
        "train > 0, got (0, 0.5, 0.5); e.g. (0.7, 0.1, 0.2), or (1, 0, 0) to meta-train on every "
        "class."
    )


# --- the DataModule without val or test


def test_absent_splits_need_no_classes_and_turn_validation_off(monkeypatch):
    printed = []
    monkeypatch.setattr(datamodule_module, "rank_zero_info", printed.append)
    dm = TrainOnly(ways=3, test_ways=50, shots=1, queries=2)  # test_ways: no split to check
    dm.setup("fit")
    assert set(dm.splits) == {"train"}
    assert not dm.has_split("val") and dm.has_split("train")
    assert dm.val_dataloader() == []
    assert printed == [dm.describe_splits(), NO_VAL]
    message = (
        "TrainOnly has no test split (a zero test fraction in split_fractions, e.g. (1, 0, 0), "
        "gives it no classes), so there is nothing to {}. Give split_fractions a test fraction, "
        "e.g. (0.8, 0, 0.2), to hold out test classes."
    )
    with pytest.raises(ValueError) as err:
        dm.setup("validate")
    assert str(err.value) == (
        "TrainOnly has no val split (a zero val fraction in split_fractions, e.g. (1, 0, 0), "
        "gives it no classes), so there is nothing to validate. Give split_fractions a val "
        "fraction, e.g. (0.8, 0.2, 0), to hold out val classes."
    )
    with pytest.raises(ValueError) as err:
        dm.test_dataloader()
    assert str(err.value) == message.format("test")
    with pytest.raises(ValueError) as err:
        dm.predict_dataloader()
    assert str(err.value) == message.format("predict")
    with pytest.raises(ValueError) as err:
        dm.setup("test")
    assert str(err.value) == message.format("test")


def test_a_source_must_give_a_training_split():
    class NoTrain(TinyDataModule):
        def build_splits(self):
            return {"val": super().build_splits()["val"]}

    with pytest.raises(ValueError) as err:
        NoTrain().setup()
    assert str(err.value) == (
        "NoTrain.build_splits() returned no train split (or one without classes); meta-training "
        "needs one."
    )


def tiny_learner() -> MetaLearnerModule:
    torch.manual_seed(0)
    optimizer = functools.partial(torch.optim.Adam, lr=1e-3)
    return MetaLearnerModule(Conv4(hidden=8, image_size=8), ProtoNet(), ways=3, optimizer=optimizer)


@pytest.mark.parametrize("limit_val_batches", [1.0, 0])
def test_lightning_fits_without_a_val_split(tmp_path, limit_val_batches):
    """Lightning skips validation for ``[]`` and for ``limit_val_batches=0``; both checkpoint."""
    dm = TrainOnly(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=2)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, inference_mode=False, default_root_dir=tmp_path,
        callbacks=[checkpoint], limit_val_batches=limit_val_batches,
    )  # fmt: skip
    trainer.fit(tiny_learner(), dm)
    assert trainer.global_step == 4
    assert "val/acc" not in trainer.callback_metrics
    assert (tmp_path / "last.ckpt").is_file()


def test_metakd_fit_meta_trains_on_every_omniglot_character(tmp_path):
    """An Omniglot config with split_fractions [1, 0, 0] runs through the real command."""
    make_alphabets(tmp_path / "omniglot" / "images_background", {"Alpha": 4, "Beta": 3})
    common = [
        "--config", str(ROOT / "configs/omniglot/protonet_5way_1shot.yaml"),
        "--data.init_args.root", str(tmp_path / "omniglot"),
        "--data.init_args.split_fractions", "[1, 0, 0]",
        "--data.init_args.ways", "5", "--model.init_args.ways", "5",
        "--data.init_args.queries", "2", "--data.init_args.steps_per_epoch", "2",
        "--data.init_args.num_workers", "0", "--trainer.max_epochs", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    ]  # fmt: skip
    noise = ("Total length of `list` across ranks is zero", "could not find the monitored key")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run_lightning_cli(["fit", *common])
    assert cli.trainer.global_step == 2
    assert cli.datamodule.splits["train"].num_classes == 4 * 7  # every character, rotated
    assert (Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt").is_file()
    assert all(any(n in str(w.message) for w in caught) for n in noise)
    # What the info line at setup suggests: the same run, without Lightning's two warnings.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet = run_lightning_cli(
            ["fit", *common, "--trainer.limit_val_batches", "0", "--checkpoint.monitor", "null"]
        )
    assert (Path(quiet.trainer.log_dir) / "checkpoints" / "best.ckpt").is_file()
    assert not [w for w in caught if any(n in str(w.message) for n in noise)]


# --- sources with zero fractions


def test_folder_trains_on_every_class(tmp_path):
    make_class_tree(tmp_path, [f"c{i}" for i in range(4)])
    dm = FolderDataModule(tmp_path, split_fractions=(1, 0, 0), image_size=8, **SMALL)
    dm.setup()
    assert set(dm.splits) == {"train"} and dm.splits["train"].num_classes == 4
    held_out = FolderDataModule(tmp_path, split_fractions=(0.5, 0, 0.5), image_size=8, **SMALL)
    held_out.setup()
    assert {s: ds.num_classes for s, ds in held_out.splits.items()} == {"train": 2, "test": 2}


def test_omniglot_split_fractions_one_zero_zero(tmp_path):
    make_alphabets(tmp_path, {"Alpha": 4, "Beta": 3, "Gamma": 4})
    for split in ("auto", "alphabet", "character"):
        dm = OmniglotDataModule(tmp_path, split=split, split_fractions=[1, 0, 0], **SMALL)
        dm.setup()
        assert set(dm.splits) == {"train"} and dm.splits["train"].num_classes == 11, split
    one = OmniglotDataModule(tmp_path / "Alpha", split="character", split_fractions=[1, 0, 0])
    with pytest.raises(FileNotFoundError, match="looks like a single alphabet"):
        one.setup()  # the alphabet folder itself is not a tree of alphabets


def test_omniglot_vinyals_refuses_zero_fractions(tmp_path):
    with pytest.raises(ValueError) as err:
        OmniglotDataModule(tmp_path, split="vinyals", split_fractions=(1, 0, 0))
    assert str(err.value) == (
        "split='vinyals' is Vinyals et al.'s fixed 1,100 / 100 / 423 character split and does not "
        "use split_fractions=(1.0, 0.0, 0.0); for a split without validation or test use "
        "split='alphabet' or 'character' (or 'auto')."
    )


# --- the summary


def test_split_summary_is_printed_once_at_setup(tmp_path, monkeypatch):
    printed = []
    monkeypatch.setattr(datamodule_module, "rank_zero_info", printed.append)
    make_alphabets(tmp_path / "images_background", {"Alpha": 4, "Beta": 3, "Gamma": 4})
    make_alphabets(tmp_path / "images_evaluation", {"Delta": 3, "Epsilon": 4})
    dm = OmniglotDataModule(tmp_path, rotations=True, **SMALL, **SMALL_EVAL)
    dm.setup("fit")
    dm.setup("test")
    summary = dm.describe_splits()
    assert summary == (
        "OmniglotDataModule (split 'alphabet'): 18 classes, 54 images\n"
        "  train     11 classes       33 images    3 alphabets  (x4 rotations: 44 classes)\n"
        "  val        3 classes        9 images    1 alphabet, 1 held out: Delta\n"
        "  test       4 classes       12 images    1 alphabet, 1 held out: Gamma"
    )
    assert printed == [summary]


def test_split_summary_counts_groups_held_out_and_rotations():
    dm = TinyDataModule(ways=3, shots=1, queries=2, groups=2, rotations=True)
    dm.setup()
    assert dm.describe_splits() == (
        "TinyDataModule: 28 classes, 168 images\n"
        "  train     12 classes       72 images    2 groups  (x4 rotations: 48 classes)\n"
        "  val        8 classes       48 images    2 groups, 2 held out: valg0, valg1\n"
        "  test       8 classes       48 images    2 groups, 2 held out: testg0, testg1"
    )


def test_split_summary_without_groups_or_evaluation_splits():
    dm = TrainOnly(ways=3, shots=1, queries=2)
    dm.setup()
    assert dm.describe_splits() == (
        "TrainOnly: 12 classes, 72 images\n"
        "  train     12 classes       72 images\n"
        "  val    none (validation is off)\n"
        "  test   none (test and predict are off)"
    )
