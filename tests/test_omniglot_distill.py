"""The Omniglot distillation configs: their teacher's episodes and data, a narrower student."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from test_real_data import make_alphabets

from lightning_metakd.lightning_cli import run_lightning_cli
from lightning_metakd.modules import DistillationModule, load_learner

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "omniglot"
PAIRS = {
    "distill_protonet.yaml": "protonet_5way_1shot.yaml",
    "distill_maml.yaml": "maml_5way_1shot.yaml",
}
#: Settings a CPU-sized distillation may change from its teacher's; every other data setting
#: (ways, shots, queries, test shape, rotations, split) is the teacher's.
SCHEDULE = {"max_epochs", "max_steps"}


def read(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


@pytest.mark.parametrize("distill", sorted(PAIRS))
def test_a_distillation_config_keeps_its_teachers_episodes(distill):
    config, teacher = read(distill), read(PAIRS[distill])
    assert config["data"] == teacher["data"]
    model, taught = config["model"]["init_args"], teacher["model"]["init_args"]
    assert model["ways"] == taught["ways"] == config["data"]["init_args"]["ways"]
    assert model["student_algorithm"] == taught["algorithm"]
    student, body = model["student_backbone"], taught["backbone"]
    assert student["class_path"] == body["class_path"]
    assert {**student["init_args"], "hidden": 64} == body["init_args"]
    assert student["init_args"]["hidden"] == 16
    name = teacher["trainer"]["logger"]["init_args"]["name"]
    assert model["teacher"] == f"runs/{name}/version_0/checkpoints/best.ckpt"
    assert [t["class_path"].rpartition(".")[2] for t in model["terms"]] == [
        "TaskLoss",
        "SoftLabels",
    ]
    assert set(config["trainer"]) - {"logger"} <= SCHEDULE
    for key in SCHEDULE & set(config["trainer"]):
        assert config["trainer"][key] <= teacher["trainer"].get(key, config["trainer"][key])


@pytest.mark.slow
@pytest.mark.parametrize("distill", sorted(PAIRS))
def test_a_distillation_config_runs_on_a_small_omniglot(distill, tmp_path):
    """Teacher, then student, two steps each on a fabricated tree (15 alphabets of 7 characters)."""
    make_alphabets(tmp_path / "omniglot", {f"Alphabet{a:02d}": 7 for a in range(15)},
                   per_character=16, distinct=True)  # fmt: skip
    tiny = ["--data.init_args.root", str(tmp_path / "omniglot"), "--trainer.max_steps", "2",
            "--data.init_args.steps_per_epoch", "2", "--data.init_args.meta_batch_size", "1",
            "--data.init_args.val_episodes", "2", "--data.init_args.test_episodes", "4",
            "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]  # fmt: skip
    run_lightning_cli(["fit", "--config", str(CONFIGS / PAIRS[distill]), *tiny])
    (teacher,) = (tmp_path / "runs").glob("*/version_0/checkpoints/best.ckpt")
    cli = run_lightning_cli(["fit", "--config", str(CONFIGS / distill), *tiny,
                             "--model.init_args.teacher", str(teacher)])  # fmt: skip
    assert isinstance(cli.model, DistillationModule) and cli.trainer.global_step == 2
    student = load_learner(cli.trainer.checkpoint_callback.last_model_path)
    assert student.backbone.hidden == 16
    assert type(student.algorithm) is type(load_learner(teacher).algorithm)
