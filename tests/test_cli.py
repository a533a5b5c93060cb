"""The `metakd` command: every config parses, and fit/test run through the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_metakd.data import EpisodicDataModule
from lightning_metakd.lightning_cli import run_lightning_cli
from lightning_metakd.modules import DistillationModule, MetaLearnerModule

ROOT = Path(__file__).resolve().parents[1]
# Pipeline YAMLs chain stage configs and `metakd finetune` YAMLs hold its arguments: neither is a
# LightningCLI config (tests/test_pipeline.py, tests/test_finetune.py).
NOT_CLI = ("pipeline.yaml", "finetune.yaml")
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.name not in NOT_CLI)


def test_there_are_configs():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_builds(config, tmp_path):
    cli = run_lightning_cli(
        ["--config", str(config), "--trainer.default_root_dir", str(tmp_path)], run=False
    )
    assert isinstance(cli.model, MetaLearnerModule | DistillationModule)
    assert isinstance(cli.datamodule, EpisodicDataModule)
    assert cli.trainer.checkpoint_callback.monitor == "val/acc"


def test_print_config_round_trips(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lightning_metakd.cli", "fit", "--config",
         str(ROOT / "configs/kanji/protonet.yaml"), "--print_config"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )  # fmt: skip
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["class_path"] == "lightning_metakd.modules.MetaLearnerModule"
    assert printed["checkpoint"]["monitor"] == "val/acc"


def test_unknown_class_is_a_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lightning_metakd.cli", "fit", "--config", str(CONFIGS[0]),
         "--model.init_args.algorithm", "lightning_metakd.algorithms.NoSuchAlgorithm"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode != 0
    assert "NoSuchAlgorithm" in out.stderr


@pytest.mark.slow
def test_fit_then_test_through_the_command(tmp_path):
    common = [
        "--config", str(ROOT / "configs/kanji/protonet.yaml"),
        "--data.init_args.max_classes", "120", "--data.init_args.max_classes_per_group", "8",
        "--data.init_args.samples_per_class", "17",
        "--data.init_args.cache_dir", str(tmp_path / "cache"), "--data.init_args.num_workers", "0",
        "--data.init_args.ways", "5", "--data.init_args.val_episodes", "4",
        "--data.init_args.test_episodes", "6", "--model.init_args.ways", "5",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    fit = subprocess.run(
        [sys.executable, "-m", "lightning_metakd.cli", "fit", *common,
         "--trainer.max_epochs", "1", "--data.init_args.steps_per_epoch", "3"],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run = tmp_path / "runs" / "kanji-protonet" / "version_0"
    assert (run / "config.yaml").is_file()
    best = run / "checkpoints" / "best.ckpt"
    assert best.is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    test = subprocess.run(
        [sys.executable, "-m", "lightning_metakd.cli", "test", *common, "--ckpt_path", str(best)],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/acc_ci95" in test.stdout
    learner = MetaLearnerModule.load_from_checkpoint(best).learner
    assert learner.ways == 5
    predict = subprocess.run(
        [sys.executable, "-m", "lightning_metakd.cli", "predict", *common, "--ckpt_path", str(best)],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stderr[-3000:]


def test_a_0_1_distillation_config_fails_with_the_new_yaml(tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump({"model": {
        "class_path": "lightning_metakd.modules.DistillationModule",
        "init_args": {"teacher": "t.ckpt", "soft_label_weight": 1.0, "temperature": 2.0},
    }}))  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        run_lightning_cli(["fit", "--config", str(config)], run=False)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "soft_label_weight, temperature are arguments of lightning-metakd 0.1" in err
    assert "    terms:\n    - class_path: lightning_metakd.distill.TaskLoss" in err
    assert "      init_args:\n        weight: 1.0\n        temperature: 2.0" in err


def test_help_lists_every_command_and_the_quickstart_config(capsys):
    from lightning_metakd.cli import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"\n  {name} " in out, name
    assert out.index("configs/kanji/pipeline.yaml") < out.index("configs/kanji/protonet.yaml")
    assert main(["nosuch"]) == 2
    assert "unknown command 'nosuch'" in capsys.readouterr().err
