"""The `metakd` command: every config parses, and fit/test run through the real command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_metakd.cli import main
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
        [sys.executable, "-m", "lightning_metakd.cli", "fit", "--config",
         str(ROOT / "configs/kanji/protonet.yaml"),
         "--model.init_args.algorithm", "lightning_metakd.algorithms.ProtoNt"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == (
        "metakd fit: error: model.init_args.algorithm: module 'lightning_metakd.algorithms' has "
        "no attribute 'ProtoNt'; did you mean 'ProtoNet'?\n"
    )


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


# -- the command as users meet it: checked checkpoints, one folder per run, one-line errors (#15) --
def tiny_config(root: Path, **data) -> dict:
    """A `metakd fit` config of the tiny in-memory data; runs go to ``root/runs/tiny/``."""
    learner = {
        "class_path": "lightning_metakd.modules.MetaLearnerModule",
        "init_args": {
            "backbone": {"class_path": "lightning_metakd.models.Conv4",
                         "init_args": {"in_channels": 1, "hidden": 4, "image_size": 16}},
            "algorithm": {"class_path": "lightning_metakd.algorithms.ProtoNet"},
            "ways": 3,
        },
    }  # fmt: skip
    return {
        "seed_everything": 0,
        "model": learner,
        "data": {"class_path": "conftest.TinyDataModule", "init_args": {
            "ways": 3, "shots": 1, "queries": 2, "meta_batch_size": 2, "steps_per_epoch": 2,
            "val_episodes": 2, "test_episodes": 2, "image_size": 16, **data}},
        "trainer": {
            "max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(root / "runs"), "name": "tiny",
                                     "default_hp_metric": False}},
        },
    }  # fmt: skip


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict:
    """A fitted tiny learner (``runs/tiny/version_0``) and a distillation checkpoint of it."""
    root = tmp_path_factory.mktemp("tiny")
    config = write_config(root / "fit.yaml", tiny_config(root))
    assert main(["fit", "--config", config]) == 0
    best = root / "runs" / "tiny" / "version_0" / "checkpoints" / "best.ckpt"
    distill = tiny_config(root)
    student = distill["model"]["init_args"]
    distill["model"] = {
        "class_path": "lightning_metakd.modules.DistillationModule",
        "init_args": {"teacher": str(best), "student_backbone": student["backbone"],
                      "student_algorithm": student["algorithm"], "ways": 3},
    }  # fmt: skip
    distill["trainer"]["logger"]["init_args"]["name"] = "tiny-distill"
    distill_config = write_config(root / "distill.yaml", distill)
    assert main(["fit", "--config", distill_config]) == 0
    distilled = root / "runs" / "tiny-distill" / "version_0" / "checkpoints" / "best.ckpt"
    return {"root": root, "config": config, "best": best, "distill_config": distill_config,
            "distilled": distilled}  # fmt: skip


def test_a_truncated_checkpoint_is_named_in_one_line(tiny_runs, capsys):
    truncated = tiny_runs["root"] / "truncated.ckpt"
    truncated.write_bytes(tiny_runs["best"].read_bytes()[:3000])
    capsys.readouterr()
    for command in ("test", "fit"):
        assert main([command, "--config", tiny_runs["config"], "--ckpt_path", str(truncated)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"metakd {command}: error: {truncated} is not a readable PyTorch "
                              "checkpoint (truncated, or not a checkpoint: ")  # fmt: skip
        assert err.endswith(
            "); use another checkpoint, e.g. last.ckpt beside it, or train again.\n"
        )
        assert err.count("\n") == 1
    missing = tiny_runs["root"] / "missing.ckpt"
    assert main(["test", "--config", tiny_runs["config"], "--ckpt_path", str(missing)]) == 2
    assert capsys.readouterr().err == (
        f"metakd test: error: No checkpoint at {missing}; pass the best.ckpt (or last.ckpt) that "
        "`metakd fit` wrote under runs/<name>/version_<N>/checkpoints/, or pretrained:<name> "
        "(`metakd pretrained` lists them).\n"
    )


def test_a_checkpoint_of_the_other_module_names_its_config(tiny_runs, capsys):
    capsys.readouterr()
    distilled, best = tiny_runs["distilled"], tiny_runs["best"]
    assert main(["test", "--config", tiny_runs["config"], "--ckpt_path", str(distilled)]) == 2
    assert capsys.readouterr().err == (
        f"metakd test: error: {distilled} is a DistillationModule checkpoint, not a "
        "MetaLearnerModule one; test it with a config whose model is a DistillationModule (e.g. "
        "configs/kanji/distill_protonet.yaml), or load its learner with load_learner(path).\n"
    )
    assert main(["test", "--config", tiny_runs["distill_config"], "--ckpt_path", str(best)]) == 2
    assert capsys.readouterr().err == (
        f"metakd test: error: {best} is a MetaLearnerModule checkpoint, not a DistillationModule "
        "one; test it with a config whose model is a MetaLearnerModule (e.g. "
        "configs/kanji/protonet.yaml), or load its learner with load_learner(path).\n"
    )


def test_testing_a_run_logs_into_that_run(tiny_runs, capsys):
    run = tiny_runs["best"].parent.parent
    config_before = (run / "config.yaml").read_text()
    for ckpt in (str(tiny_runs["best"]), "best"):
        assert main(["test", "--config", tiny_runs["config"], "--ckpt_path", ckpt]) == 0
    assert f"metakd test: --ckpt_path best is {tiny_runs['best']}\n" in capsys.readouterr().err
    assert [p.name for p in run.parent.iterdir()] == ["version_0"]  # no version per call
    assert (run / "config.yaml").read_text() == config_before  # the training config is kept
    saved = yaml.safe_load((run / "test_config.yaml").read_text())
    assert saved["ckpt_path"] == str(tiny_runs["best"])


def test_ckpt_path_last_without_a_run_refuses(tmp_path, capsys):
    config = write_config(tmp_path / "fit.yaml", tiny_config(tmp_path))
    assert main(["fit", "--config", config, "--ckpt_path", "last"]) == 2
    assert capsys.readouterr().err == (
        f"metakd fit: error: --ckpt_path last: no {tmp_path}/runs/tiny/version_*/checkpoints/"
        "last.ckpt to resume; run `metakd fit` without --ckpt_path first, or pass the path of the "
        "checkpoint to use.\n"
    )
    assert not (tmp_path / "runs").exists()


def test_config_mistakes_are_one_line_with_a_suggestion(tmp_path, capsys):
    config = tiny_config(tmp_path)
    config["data"]["init_args"]["shot"] = config["data"]["init_args"].pop("shots")
    assert main(["fit", "--config", write_config(tmp_path / "typo.yaml", config)]) == 2
    assert capsys.readouterr().err == (
        "metakd fit: error: data.init_args.shot: conftest.TinyDataModule takes no argument "
        "'shot'; did you mean 'shots'?\n"
    )
    config = write_config(tmp_path / "fit.yaml", tiny_config(tmp_path))
    assert main(["fit", "--config", config, "--trainer.max_epohcs", "2"]) == 2
    assert capsys.readouterr().err == (
        "metakd fit: error: unrecognized argument '--trainer.max_epohcs'; did you mean "
        "'--trainer.max_epochs'?\n"
    )
    assert main(["fit", "--config", config, "--model.init_args.ways", "1"]) == 2
    assert capsys.readouterr().err == "metakd fit: error: ways must be at least 2, got 1.\n"
    with pytest.raises(ValueError, match="Does not validate") as raised:
        main(["fit", "--config", config, "--model.init_args.ways", "1", "--traceback"])
    assert str(raised.value.__cause__) == "ways must be at least 2, got 1."
    assert not (tmp_path / "runs").exists()


def test_turning_checkpoints_off_is_one_line_naming_the_fix(tmp_path, capsys):
    """Lightning itself would fail with a traceback (the config's checkpoint callback and
    enable_checkpointing=False clash) after building the model and the data."""
    config = write_config(tmp_path / "fit.yaml", tiny_config(tmp_path))
    assert main(["fit", "--config", config, "--trainer.enable_checkpointing", "false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metakd fit: error: --trainer.enable_checkpointing false: metakd ")
    assert err.count("\n") == 1 and "drop the flag" in err
    assert not (tmp_path / "runs").exists()


def test_a_fit_that_fails_before_a_checkpoint_leaves_no_version_folder(tmp_path, capsys):
    config = write_config(tmp_path / "fit.yaml", tiny_config(tmp_path, ways=10))
    assert main(["fit", "--config", config, "--model.init_args.ways", "10"]) == 2
    err = capsys.readouterr().err
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert f"metakd fit: removed {run}: the run failed before writing a checkpoint\n" in err
    assert err.endswith(
        "metakd fit: error: A task needs 10 ways but the val split has only 8 classes. Lower "
        "test_ways to at most 8, or give the val split more classes.\n"
    )
    assert not run.exists()
    assert main(["fit", "--config", write_config(tmp_path / "ok.yaml", tiny_config(tmp_path))]) == 0
    assert (run / "checkpoints" / "best.ckpt").is_file()  # the next run is version_0 again


def test_the_cli_does_not_warn_about_args_given_on_purpose(tmp_path, monkeypatch):
    """Lightning warns when `args` and `sys.argv` are both given; the pipeline and `metakd` pass
    `args` on purpose, with sys.argv full (here: a command line of its own, as pytest's is not
    under pytest-xdist)."""
    import warnings

    config = write_config(tmp_path / "fit.yaml", tiny_config(tmp_path))
    monkeypatch.setattr(sys, "argv", ["metakd", "pipeline", "--config", "pipeline.yaml"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_lightning_cli(["--config", config], run=False)
    assert not [w for w in caught if "not recommended to provide both" in str(w.message)]


def test_an_image_size_that_cannot_feed_the_model_fails_before_the_render(tmp_path, capsys):
    from lightning_metakd.cli import main

    cache = tmp_path / "cache"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "lightning_metakd.modules.MetaLearnerModule", "init_args": {
            "backbone": {"class_path": "lightning_metakd.models.Conv4",
                         "init_args": {"hidden": 4, "image_size": 28}},
            "algorithm": {"class_path": "lightning_metakd.algorithms.ProtoNet"}, "ways": 5}},
        "data": {"class_path": "lightning_metakd.data.KanjiDataModule",
                 "init_args": {"image_size": 32, "cache_dir": str(cache)}},
        "trainer": {"logger": False, "default_root_dir": str(tmp_path)},
    }))  # fmt: skip
    assert main(["fit", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "the learner's backbone was built for 28x28 images but the data has image_size=32" in err
    assert "--data.init_args.image_size 28" in err
    assert not cache.exists() or not any(cache.iterdir())  # nothing rendered
