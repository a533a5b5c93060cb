"""Cross-domain testing: ``metakd test|report --data <yaml>`` evaluate a checkpoint on a data module
other than the one it was trained on, with image sizes and channels checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_real_data import make_alphabets, make_class_tree

from lightning_metakd.algorithms import Learner, ProtoNet
from lightning_metakd.cli import main
from lightning_metakd.data import FolderDataModule, OmniglotDataModule
from lightning_metakd.lightning_cli import data_fixes, data_section, run_lightning_cli
from lightning_metakd.models import Conv4
from lightning_metakd.modules import load_learner
from lightning_metakd.report import measure

ROOT = Path(__file__).resolve().parents[1]
KANJI = str(ROOT / "configs/kanji/protonet.yaml")
MODEL = {
    "class_path": "lightning_metakd.modules.MetaLearnerModule",
    "init_args": {
        "backbone": {
            "class_path": "lightning_metakd.models.Conv4",
            "init_args": {"in_channels": 1, "hidden": 4, "image_size": 16},
        },
        "algorithm": {"class_path": "lightning_metakd.algorithms.ProtoNet"},
        "ways": 3,
    },
}
TRAINER = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


def folder_data(root: Path, **init_args) -> dict:
    """A FolderDataModule whose classes are nearly all test classes (2 train, 0 val)."""
    args = {"root": str(root), "channels": 1, "image_size": 16, "ways": 2, "shots": 1,
            "queries": 1, "test_ways": 3, "test_shots": 1, "test_queries": 2,
            "test_episodes": 8, "split_fractions": [0.3, 0, 0.7]}  # fmt: skip
    return {
        "class_path": "lightning_metakd.data.FolderDataModule",
        "init_args": {**args, **init_args},
    }


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, Path]:
    """A 1-channel 16x16 Conv4 ProtoNet trained 2 steps by `metakd fit`: (its config, last.ckpt)."""
    folder = tmp_path_factory.mktemp("teacher")
    data = {"class_path": "conftest.TinyDataModule",
            "init_args": {"ways": 3, "shots": 1, "queries": 2, "image_size": 16}}  # fmt: skip
    config = folder / "teacher.yaml"
    trainer = {**TRAINER, "max_steps": 2, "limit_val_batches": 0, "default_root_dir": str(folder)}
    config.write_text(yaml.safe_dump({"seed_everything": 0, "model": MODEL, "data": data,
                                      "trainer": trainer}))  # fmt: skip
    run_lightning_cli(["fit", "--config", str(config), "--checkpoint.monitor", "null"])
    return config, folder / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("characters")
    make_class_tree(root, [f"char{i:02d}" for i in range(10)], per_class=4)
    return root


# -- reading --data ----------------------------------------------------------------------------------
def test_data_section_reads_a_config_or_a_data_only_yaml(tmp_path):
    section = folder_data(tmp_path)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": section, "trainer": {}}))
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(section))
    assert data_section(tmp_path / "config.yaml") == section
    assert data_section(tmp_path / "data.yaml") == section
    assert data_section(KANJI)["class_path"] == "lightning_metakd.data.KanjiDataModule"
    (tmp_path / "model.yaml").write_text(yaml.safe_dump({"model": MODEL}))
    with pytest.raises(ValueError) as err:
        data_section(tmp_path / "model.yaml")
    assert str(err.value) == (
        f"--data {tmp_path / 'model.yaml'}: it has no `data:` section with a class_path; pass a "
        "config that has one (e.g. configs/omniglot/protonet_5way_1shot.yaml), or a YAML holding "
        "only `class_path: lightning_metakd.data.FolderDataModule` and its `init_args:`."
    )
    with pytest.raises(ValueError, match=r"^--data .*missing.yaml: cannot read it \("):
        data_section(tmp_path / "missing.yaml")


def test_data_of_another_config_replaces_the_data_whole(tmp_path):
    """jsonargparse alone keeps the KanjiVG config's grouping, val_episodes, test_queries, ..."""
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({"data": folder_data(tmp_path)}))
    cli = run_lightning_cli(["--config", KANJI, "--data", str(tmp_path / "other.yaml"),
                             "--data.init_args.test_episodes", "5"], run=False)  # fmt: skip
    dm = cli.datamodule
    assert isinstance(dm, FolderDataModule)
    assert (dm.grouping, dm.val_episodes, dm.test_queries, dm.test_episodes) == ("none", 100, 2, 5)
    assert (dm.meta_batch_size, dm.steps_per_epoch, dm.image_channels) == (32, 100, 1)
    assert cli.replaced_data
    assert not run_lightning_cli(["--config", KANJI], run=False).replaced_data


# -- metakd test --data ------------------------------------------------------------------------------
def test_a_checkpoint_is_tested_on_another_data_module(teacher, tree, tmp_path):
    config, checkpoint = teacher
    other = tmp_path / "characters.yaml"
    other.write_text(yaml.safe_dump({"data": folder_data(tree)}))
    # With a logger: Lightning would refuse the module's ways=3 beside the data's ways=2.
    cli = run_lightning_cli(["test", "--config", str(config), "--data", str(other),
                             "--ckpt_path", str(checkpoint),
                             "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
                             "--trainer.logger.init_args.save_dir", str(tmp_path)])  # fmt: skip
    accuracy = float(cli.trainer.callback_metrics["test/acc"])
    assert cli.datamodule.ways == 2 and cli.model.learner.ways == 3
    # The same number as the checkpoint's learner measured on the folder's own test episodes.
    dm = FolderDataModule(**folder_data(tree)["init_args"])
    expected = measure(load_learner(checkpoint), dm, warmup=0, repeats=1)
    assert accuracy == pytest.approx(expected["accuracy"], abs=1e-6)
    assert len(expected["episode_accuracy"]) == 8
    assert dm.splits["test"].num_classes == 7


def test_mismatched_size_and_channels_name_the_flags(teacher, tree, tmp_path, capsys):
    config, checkpoint = teacher
    other = tmp_path / "rgb.yaml"
    other.write_text(yaml.safe_dump(folder_data(tree, channels=3, image_size=28)))
    args = ["test", "--config", str(config), "--data", str(other), "--ckpt_path", str(checkpoint),
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        run_lightning_cli(args)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "metakd test: error: --data gives 3-channel 28x28 images but the checkpoint's learner "
        "takes 1-channel 16x16; add --data.init_args.image_size 16 --data.init_args.channels 1 "
        "after --data."
    )
    with pytest.raises(SystemExit):
        run_lightning_cli([*args, "--data.init_args.image_size", "16"])
    assert capsys.readouterr().err.splitlines()[-1] == (
        "metakd test: error: --data gives 3-channel 16x16 images but the checkpoint's learner "
        "takes 1-channel 16x16; add --data.init_args.channels 1 after --data."
    )


def test_channels_that_cannot_match_say_so(tmp_path):
    make_alphabets(tmp_path, {f"Alphabet{a}": 4 for a in range(6)}, per_character=3)
    omniglot = OmniglotDataModule(tmp_path, image_size=16, ways=2, shots=1, queries=1,
                                  val_episodes=2, test_episodes=2)  # fmt: skip
    rgb = Learner(Conv4(in_channels=3, hidden=4, image_size=16), ProtoNet(), ways=2)
    with pytest.raises(ValueError) as err:
        data_fixes(rgb, omniglot)
    assert str(err.value) == (
        "OmniglotDataModule serves 1-channel images and has no channels setting, so a 3-channel "
        "learner cannot be tested on it; read the images with lightning_metakd.data."
        "FolderDataModule (channels: 3) instead."
    )
    grey = Learner(Conv4(in_channels=1, hidden=4, image_size=28), ProtoNet(), ways=2)
    assert data_fixes(grey, omniglot) == {"image_size": 28}


# -- metakd report --data ----------------------------------------------------------------------------
def test_report_takes_its_episodes_from_data(teacher, tree, tmp_path, capsys):
    config, checkpoint = teacher
    other = tmp_path / "characters.yaml"
    other.write_text(yaml.safe_dump({"data": folder_data(tree)}))
    args = ["report", "--config", str(config), "--data", str(other), "--out", str(tmp_path / "r"),
            "--repeats", "1", "--checkpoint", f"teacher={checkpoint}"]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((tmp_path / "r" / "report.json").read_text())
    dm = FolderDataModule(**folder_data(tree)["init_args"])
    expected = measure(load_learner(checkpoint), dm, warmup=0, repeats=1)
    assert [r["name"] for r in rows] == ["teacher"]
    assert rows[0]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
    capsys.readouterr()
    other.write_text(yaml.safe_dump({"data": folder_data(tree, channels=3)}))
    assert main(args) == 2
    assert capsys.readouterr().err == (
        "metakd report: error: --data gives 3-channel 16x16 images but 'teacher' takes 1-channel "
        f"16x16; set channels: 1 in {other}'s data init_args.\n"
    )


def test_the_console_command_reads_data_too(teacher, tree, tmp_path):
    """From the console LightningCLI reads sys.argv itself: the rewrite must reach it there."""
    config, checkpoint = teacher
    other = tmp_path / "rgb.yaml"
    other.write_text(yaml.safe_dump({"data": folder_data(tree, channels=3)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    out = subprocess.run(
        [sys.executable, "-m", "lightning_metakd.cli", "test", "--config", str(config),
         "--data", str(other), "--ckpt_path", str(checkpoint)],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1] == (
        "metakd test: error: --data gives 3-channel 16x16 images but the checkpoint's learner "
        "takes 1-channel 16x16; add --data.init_args.channels 1 after --data."
    )
