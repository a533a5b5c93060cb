"""Reliability: data that does not fit fails at setup, a diverging loss stops the run cleanly, and the
test suite leaves nothing behind.

Where each bad-input case of issue #7 is tested (one clear error each, naming problem and fix):

- ways larger than a split's classes: ``test_episodes.py::test_too_many_ways_is_a_clear_error``,
  ``test_kanji.py::test_too_many_ways_for_a_split_is_a_clear_error``
- shots + queries larger than a class's images:
  ``test_episodes.py::test_too_few_images_names_the_class``,
  ``test_real_data.py::test_folder_class_with_too_few_images``
- image sizes that do not match the backbone:
  ``test_meta_learner.py::test_mismatched_episode_is_a_clear_error`` (per episode),
  ``test_models.py::test_bad_inputs_and_arguments_fail_with_clear_messages``, and here at setup
  (``test_learner_that_does_not_fit_the_data_fails_at_setup``)
- a missing or wrongly laid-out data root: ``test_real_data.py::test_folder_root_that_does_not_exist``,
  ``::test_folder_root_that_is_a_file``, ``::test_folder_missing_split_folder_is_named``,
  ``::test_folder_images_without_class_folders``, ``::test_folder_empty_root``,
  ``::test_omniglot_wrong_layouts``, ``::test_mini_imagenet_wrong_layout_shows_the_expected_trees``
- a corrupt or truncated image file: ``test_real_data.py::test_folder_truncated_image_names_the_file``,
  ``test_episodes.py::test_unreadable_image_file_is_named``,
  ``test_real_data.py::test_mini_imagenet_damaged_caches``,
  ``test_kanji.py::test_corrupt_cache_is_detected_and_rendered_again`` (re-rendered, with a warning)
- a teacher checkpoint that is not a ``MetaLearnerModule`` checkpoint:
  ``test_distillation.py::test_bad_teacher_is_a_clear_error``,
  ``test_meta_learner.py::test_not_a_learner_checkpoint_is_a_clear_error``; whose ways or image
  size do not match the data: here (``test_teacher_that_does_not_fit_the_data_fails_at_setup``,
  ``test_teacher_checkpoint_records_what_the_data_is_checked_against``)
- negative loss weights or temperature, repeated term names:
  ``test_distillation.py::test_bad_terms_are_clear_errors``,
  ``test_distill_losses.py::test_soft_label_loss_bad_input`` (and the other ``*_bad_input`` tests)
- parameter anchoring between incompatible shapes:
  ``test_distill_losses.py::test_parameter_anchor_errors_name_the_parameters``,
  ``test_distillation.py::test_anchor_between_incompatible_shapes_is_a_clear_error``
- a config that names an unknown class: ``test_cli.py::test_unknown_class_is_a_clear_error``,
  ``test_pipeline.py::test_bad_pipeline_configs_are_clear_errors``
- no loader executes pickled code: ``test_real_data.py::test_restricted_unpickler_refuses_code``,
  ``::test_mini_imagenet_refuses_a_malicious_cache``; checkpoints load with
  ``torch.load(weights_only=True)`` (``modules/checkpoint.py::read_checkpoint``), here too.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TinyDataModule
from leftovers import left_behind, snapshot
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_metakd import NonFiniteLossError
from lightning_metakd.algorithms import MAML, ProtoNet
from lightning_metakd.lightning_cli import run_lightning_cli
from lightning_metakd.models import Conv4
from lightning_metakd.modules import DistillationModule, MetaLearnerModule
from lightning_metakd.modules.finite import check_finite_loss

ROOT = Path(__file__).resolve().parents[1]
ADAM = functools.partial(torch.optim.Adam, lr=5e-3)


def tiny_data(**kwargs) -> TinyDataModule:
    defaults = dict(
        ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=6, val_episodes=2,
        test_episodes=2, image_size=16,
    )  # fmt: skip
    return TinyDataModule(**{**defaults, **kwargs})


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    return L.Trainer(**{**defaults, **kwargs})


def learner(algorithm=None, ways: int = 3, **backbone) -> MetaLearnerModule:
    torch.manual_seed(0)
    backbone = {"hidden": 4, "image_size": 16, **backbone}
    return MetaLearnerModule(Conv4(**backbone), algorithm or ProtoNet(), ways, optimizer=ADAM)


def distiller(teacher, ways: int = 3, **kwargs) -> DistillationModule:
    torch.manual_seed(1)
    return DistillationModule(
        teacher, Conv4(hidden=4, image_size=16), ProtoNet(), ways=ways, optimizer=ADAM, **kwargs
    )


class StepCounter(L.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


def fit_fails(tmp_path: Path, module: L.LightningModule, data, match: str, **kwargs) -> None:
    """``fit`` raises ``ValueError(match)`` from ``setup``, before any training step."""
    counter = StepCounter()
    run = trainer(tmp_path, callbacks=[counter], **kwargs)
    with pytest.raises(ValueError, match=match):
        run.fit(module, data)
    assert counter.steps == 0 and run.global_step == 0


# -- data that does not fit the learner fails at setup ---------------------------------------------
def test_learner_that_does_not_fit_the_data_fails_at_setup(tmp_path):
    # The per-episode check would say "the episode is 3-way"; these name the data's settings.
    fit_fails(
        tmp_path, learner(MAML(), ways=5), tiny_data(),
        r"learner's MAML head is 5-way but the data module has ways=3; set the data's ways to 5",
    )  # fmt: skip
    fit_fails(
        tmp_path, learner(MAML()), tiny_data(test_ways=4), "data module has test_ways=4",
        limit_val_batches=1,
    )  # fmt: skip
    fit_fails(
        tmp_path, learner(image_size=28), tiny_data(),
        r"backbone was built for 28x28 images but the data module has image_size=16; set the "
        r"data's image_size to 28",
    )  # fmt: skip
    fit_fails(tmp_path, learner(in_channels=3), tiny_data(), "expects 3-channel images")
    with pytest.raises(ValueError, match="data module has test_ways=4"):
        trainer(tmp_path).test(learner(MAML()), tiny_data(test_ways=4), verbose=False)
    # Controls: a metric learner has no head, and test_ways is unused when validation is off.
    trainer(tmp_path, max_steps=1).fit(learner(ProtoNet(), ways=5), tiny_data())
    run = trainer(tmp_path, max_steps=1)
    run.fit(learner(MAML()), tiny_data(test_ways=4))
    assert run.global_step == 1


def test_teacher_that_does_not_fit_the_data_fails_at_setup(tmp_path):
    head = learner(MAML(), ways=5)
    fit_fails(
        tmp_path, distiller(head, ways=5), tiny_data(),
        r"teacher's MAML head is 5-way but the data module has ways=3",
    )  # fmt: skip
    fit_fails(
        tmp_path, distiller(learner(image_size=28)), tiny_data(),
        r"teacher's backbone was built for 28x28 images but the data module has image_size=16",
    )  # fmt: skip
    student = DistillationModule(learner(), Conv4(hidden=4, image_size=16), MAML(), ways=4)
    fit_fails(tmp_path, student, tiny_data(), "student's MAML head is 4-way")
    # The teacher only sees training episodes: evaluating the student on other ways is fine.
    model = distiller(head, ways=5)
    trainer(tmp_path).test(model, tiny_data(ways=5, test_ways=3), verbose=False)


def test_teacher_checkpoint_records_what_the_data_is_checked_against(tmp_path):
    """A teacher read from its checkpoint brings its head's ways and image size along."""
    teacher = learner(MAML(), ways=5)
    run = trainer(tmp_path, max_steps=1)
    run.fit(teacher, tiny_data(ways=5))
    path = tmp_path / "teacher.ckpt"
    run.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # no pickled code in our checkpoints
    assert checkpoint["hyper_parameters"]["ways"] == 5
    assert checkpoint["metakd_components"]["learner"]["backbone"]["init_args"]["image_size"] == 16
    fit_fails(
        tmp_path, distiller(str(path), ways=5), tiny_data(),
        r"teacher's MAML head is 5-way but the data module has ways=3; set the data's ways to 5",
    )  # fmt: skip
    fit_fails(
        tmp_path, distiller(str(path), ways=5), tiny_data(ways=5, image_size=20),
        "teacher's backbone was built for 16x16 images but the data module has image_size=20",
    )  # fmt: skip
    control = trainer(tmp_path, max_steps=1)
    control.fit(distiller(str(path), ways=5), tiny_data(ways=5))
    assert control.global_step == 1


# -- a loss that is not finite stops the run -------------------------------------------------------
def test_check_finite_loss_names_the_term_and_the_step():
    module = L.LightningModule()
    one, inf = torch.tensor(1.0), torch.tensor(math.inf)
    check_finite_loss(module, 0, one, {"task": one, "soft": one})
    check_finite_loss(module, 0, torch.tensor(1e300, dtype=torch.float64))  # finite in float64
    with pytest.raises(NonFiniteLossError) as err:
        check_finite_loss(module, 7, inf, {"task": one, "soft": -inf})
    assert err.value.terms == {"train/loss": math.inf, "train/loss_soft": -math.inf}
    assert (err.value.step, err.value.batch_idx) == (0, 7)
    message = str(err.value)
    assert "global step 0 (batch_idx 7): train/loss=inf, train/loss_soft=-inf." in message
    assert "train/loss_task" not in message
    for advice in ("lower learning rate", "precision=32-true", "gradient_clip_val"):
        assert advice in message
    assert isinstance(err.value, RuntimeError)


def poison_from(step: int, module: L.LightningModule, algorithm, method: str, monkeypatch) -> None:
    """``algorithm.<method>`` returns NaN logits in training from ``module``'s global step ``step``."""
    original = getattr(algorithm, method)

    def poisoned(*args, **kwargs):
        logits = original(*args, **kwargs)
        return logits * math.nan if module.training and module.global_step >= step else logits

    monkeypatch.setattr(algorithm, method, poisoned)


def finite_parameters(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


class CheckpointsBefore(L.Callback):
    """Records the bytes of every ``*.ckpt`` under ``root`` as global step ``step`` starts."""

    def __init__(self, root: Path, step: int) -> None:
        self.root, self.step, self.files = root, step, None

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            self.files = checkpoint_files(self.root)


def checkpoint_files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*.ckpt")}


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Under the `metakd` trainer defaults: their callbacks and logger, and their checkpoint
    callback (best ``val/acc`` and last), which saves after validation — here every one-step epoch.

    Lightning 2.6 refreshes ``last.ckpt`` only when a best checkpoint is saved at that step, so the
    last checkpoint may predate step k-1; what matters is that none is written or changed at step k.
    """
    cli = run_lightning_cli(
        ["--config", str(ROOT / "configs/kanji/protonet.yaml"),
         "--trainer.default_root_dir", str(tmp_path),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
         "--trainer.max_steps", "10", "--trainer.limit_val_batches", "1",
         "--trainer.num_sanity_val_steps", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"],
        run=False,
    )  # fmt: skip
    model, k = learner(), 3
    poison_from(k, model, model.learner.algorithm, "episode_logits", monkeypatch)
    before = CheckpointsBefore(tmp_path, k)
    cli.trainer.callbacks.append(before)
    expected = rf"global step {k} \(batch_idx 0\): train/loss=nan"
    with pytest.raises(NonFiniteLossError, match=expected):
        cli.trainer.fit(model, tiny_data(steps_per_epoch=1))
    assert before.files and checkpoint_files(tmp_path) == before.files  # nothing written on error
    assert {p.name for p in before.files} == {"best.ckpt", "last.ckpt"}
    for path in before.files:
        checkpoint = torch.load(path, weights_only=True)
        assert 1 <= checkpoint["global_step"] <= k and finite_parameters(checkpoint["state_dict"])
        restored = MetaLearnerModule.load_from_checkpoint(path)
        assert torch.isfinite(restored.episode_loss(first_episode()).loss)


def first_episode():
    data = tiny_data()
    data.setup()
    return next(iter(data.train_dataloader()))


def test_nan_distillation_term_is_named_and_the_last_checkpoint_kept(tmp_path, monkeypatch):
    model, k = distiller(learner(hidden=8)), 2
    # NaN teacher logits make the soft-label term (and the sum) NaN; the task term stays finite.
    poison_from(k, model, model.teachers[0].algorithm, "logits", monkeypatch)
    before = CheckpointsBefore(tmp_path, k)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    run = trainer(
        tmp_path, max_steps=10, callbacks=[checkpoints, before], enable_checkpointing=True
    )
    with pytest.raises(NonFiniteLossError) as err:
        run.fit(model, tiny_data())
    assert (err.value.step, err.value.batch_idx) == (k, k)
    assert set(err.value.terms) == {"train/loss", "train/loss_soft_labels"}
    assert "train/loss_soft_labels=nan" in str(err.value)
    assert "train/loss_task" not in str(err.value)
    assert before.files and checkpoint_files(tmp_path) == before.files  # nothing written on error
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == k  # saved after step k-1's update, the last finite step
    assert finite_parameters(checkpoint["state_dict"])
    # Step k changed nothing: the checkpoint holds the parameters the run stopped with.
    for name, value in model.state_dict().items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=0, atol=0)
    restored = DistillationModule.load_from_checkpoint(last)
    out = restored.episode_loss(first_episode())
    assert all(torch.isfinite(v) for v in (out.loss, *out.terms.values()))


DDP_WORKER = """
import math, sys
import lightning as L, torch
sys.path.insert(0, {tests!r})
from conftest import TinyDataModule
from lightning_metakd import NonFiniteLossError
from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule

torch.manual_seed(0)
model = MetaLearnerModule(Conv4(hidden=4, image_size=16), ProtoNet(), ways=3)
original = model.learner.algorithm.episode_logits

def poisoned(*args, **kwargs):  # NaN on rank 1 only, from step 2
    logits = original(*args, **kwargs)
    return logits * math.nan if model.global_rank == 1 and model.global_step >= 2 else logits

model.learner.algorithm.episode_logits = poisoned
data = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=6,
                      val_episodes=2, test_episodes=2, image_size=16)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, default_root_dir={out!r})
try:
    trainer.fit(model, data)
    result = "finished"
except NonFiniteLossError as err:
    result = f"{{err.step}} {{sorted(err.terms)}}"
with open({out!r} + f"/rank{{trainer.global_rank}}.txt", "w") as f:
    f.write(result)
"""


@pytest.mark.slow
def test_nan_on_one_ddp_process_stops_every_process_at_that_step(tmp_path):
    """Both processes raise the error at step 2, though only rank 1's loss is NaN.

    Without the joint decision rank 1 stops alone and rank 0 waits in the gradient all-reduce:
    with gloo it dies of "Connection closed by peer" (no rank0.txt), with NCCL it hangs.
    """
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER.format(tests=str(ROOT / "tests"), out=str(tmp_path)))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    files = {r: tmp_path / f"rank{r}.txt" for r in (0, 1)}
    outcome = {r: f.read_text() if f.is_file() else None for r, f in files.items()}
    assert outcome == {0: "2 []", 1: "2 ['train/loss']"}, proc.stderr[-3000:]


# -- the suite leaves nothing behind (tests/leftovers.py) -----------------------------------------
def test_snapshot_finds_new_paths_only(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.txt").write_text("x")
    before = snapshot(tmp_path)
    (tmp_path / "kept" / "new.txt").write_text("x")
    (tmp_path / "lightning_logs" / "version_0").mkdir(parents=True)
    (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").write_text("x")
    for tooling in ("__pycache__", ".pytest_cache", "x.egg-info", ".git"):
        (tmp_path / tooling).mkdir()
        (tmp_path / tooling / "f").write_text("x")
    new = left_behind(before, snapshot(tmp_path))
    assert new == [str(tmp_path / "kept" / "new.txt"), str(tmp_path / "lightning_logs")]
    assert left_behind(before, snapshot(tmp_path / "kept", recursive=False) | before) == [
        str(tmp_path / "kept" / "new.txt")
    ]
    assert left_behind(before, before) == []


LEAKY_TEST = """
from pathlib import Path

def test_writes(tmp_path):
    (tmp_path / "fine.txt").write_text("x")  # a temporary folder: allowed
    if {leak}:
        Path("config.yaml").write_text("x")  # the working directory: left behind
"""


@pytest.mark.parametrize("leak", [True, False])
def test_a_session_that_leaves_files_behind_fails(tmp_path, leak):
    """pytest on a test that writes to its working directory exits 1 and names the file.

    The inner session loads tests/leftovers.py alone; its working directory lies outside the
    repository, so the check watches that directory's top level (and the repository).
    """
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "test_leaky.py").write_text(LEAKY_TEST.format(leak=leak))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "leftovers",
         "--basetemp", str(tmp_path / "basetemp"), "test_leaky.py"],
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])},
    )  # fmt: skip
    assert "1 passed" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.returncode == (1 if leak else 0), proc.stdout[-2000:]
    assert ("files left behind" in proc.stdout) is leak
    assert (str(cwd / "config.yaml") in proc.stdout) is leak
