"""Faults and resumption: a run killed mid-epoch, and a pipeline killed in any stage, resume exactly.

Lightning 2.6 restores a mid-epoch checkpoint's loop counters (``k`` of ``n`` batches done) but
starts a plain ``DataLoader`` at the first batch of the epoch again, so the resumed run would train
on batches ``0 .. n-k-1`` twice and never on the last ``k``. The episode loaders are stateful
(``lightning_metakd/data/loader.py``) and the data module keeps the random states in checkpoints;
these tests prove the result:

- fast, in one process: an exception stops a run after step ``k`` (mid-epoch, at the last batch of
  an epoch, or resumed from an end-of-epoch checkpoint) while its training transform draws from
  torch's, NumPy's and Python's global generators; the resumed run ends with exactly (``torch.equal``)
  the parameters and Adam state of the uninterrupted run. Controls: without the loader state, or
  without the random states, the same comparison fails.
- slow, real processes and a real ``SIGKILL``: ``metakd fit`` killed after step 4 of 6 (mid-epoch
  1) and resumed with ``--ckpt_path last.ckpt`` ends with bit-identical parameters, optimizer state
  and validation/test metrics; ``metakd pipeline`` killed inside each stage in turn reruns that stage
  only, leaves the finished stages' files untouched, and reports the numbers of an uninterrupted
  pipeline.

The kills come from this file run as a script (``python tests/test_resume.py [hooks] -- <metakd
args>``): the ``metakd`` entry point with test-only hooks that SIGKILL the process at a fixed point.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from conftest import TinyDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Sampler

from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.callbacks import BestAndLastCheckpoint
from lightning_metakd.data import Episode, EpisodeSampler
from lightning_metakd.data.loader import EpisodeLoader, random_states, set_random_states
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule

# Resuming writes into the checkpoint folder of the interrupted run, as it should.
pytestmark = pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
TESTS = Path(__file__).resolve().parent
STEPS_PER_EPOCH, EPOCHS = 3, 2
#: The tiny data of every run here: 3-way 1-shot, 2 tasks per step, 16x16 images.
DATA = {
    "ways": 3, "shots": 1, "queries": 2, "meta_batch_size": 2, "steps_per_epoch": STEPS_PER_EPOCH,
    "val_episodes": 3, "test_episodes": 4, "image_size": 16,
}  # fmt: skip


# -- the sampler and the loader on their own ---------------------------------------------------------
def train_loader(dm: TinyDataModule) -> EpisodeLoader:
    loader = dm.train_dataloader()
    assert isinstance(loader, EpisodeLoader)
    return loader


def classes(batches) -> list[list[list[int]]]:
    return [b.classes.tolist() for b in batches]


def test_sampler_skip_next_skips_once_and_keeps_its_length():
    dm = TinyDataModule(**DATA)
    dm.setup()
    sampler = dm.sampler("train")
    sampler.set_epoch(1)
    full = list(sampler)
    sampler.skip_next(4)
    assert list(sampler) == full[4:] and len(sampler) == len(full) == 6
    assert list(sampler) == full  # only the next iteration skips
    with pytest.raises(ValueError, match="non-negative"):
        sampler.skip_next(-1)


@pytest.mark.parametrize("epoch", [0, 1])
def test_loader_resumes_after_the_batches_it_handed_out(epoch):
    dm = TinyDataModule(**DATA)
    dm.setup()
    first = train_loader(dm)
    first.sampler.set_epoch(epoch)
    full = classes(first)
    assert first.state_dict() == {"epoch": epoch, "batches": STEPS_PER_EPOCH}
    assert len(set(map(str, full))) == STEPS_PER_EPOCH  # distinct batches: the order is visible

    killed = train_loader(dm)
    killed.sampler.set_epoch(epoch)
    iterator = iter(killed)
    next(iterator)
    state = killed.state_dict()
    assert state == {"epoch": epoch, "batches": 1}

    resumed = train_loader(dm)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(epoch)  # Lightning sets the epoch after load_state_dict
    assert classes(resumed) == full[1:] and len(resumed) == STEPS_PER_EPOCH
    assert resumed.state_dict() == {"epoch": epoch, "batches": STEPS_PER_EPOCH}
    assert classes(resumed) == full  # the next iteration is a whole epoch again

    other = train_loader(dm)
    other.load_state_dict(state)
    other.sampler.set_epoch(epoch + 1)  # a state of another epoch skips nothing
    assert len(classes(other)) == STEPS_PER_EPOCH


class PlainSampler(Sampler):
    """A sampler without ``skip_next``: the loader must drop the batches itself."""

    def __init__(self, inner: EpisodeSampler) -> None:
        self.inner = inner
        self.epoch = inner.epoch

    def __iter__(self):
        self.inner.set_epoch(self.epoch)
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def test_loader_resumes_with_a_sampler_that_cannot_skip():
    dm = TinyDataModule(**DATA)
    dm.setup()

    def loader() -> EpisodeLoader:
        return EpisodeLoader(
            dm.splits["train"], sampler=PlainSampler(dm.sampler("train")), batch_size=2,
            collate_fn=Episode.from_tasks,
        )  # fmt: skip

    full = classes(loader())
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "batches": 2})
    assert classes(resumed) == full[2:]
    with pytest.raises(KeyError, match="'batches'"):
        resumed.load_state_dict({"epoch": 0})


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.save({"states": random_states()}, tmp_path / "states.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_random_states(torch.load(tmp_path / "states.pt", weights_only=True)["states"])
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_iterating_loaders_never_moves_the_global_generator():
    dm = TinyDataModule(**DATA)
    dm.setup()
    before = torch.get_rng_state()
    for split in ("train", "val", "test"):
        list(dm.dataloader(split))
    assert torch.equal(torch.get_rng_state(), before)


# -- a whole run, interrupted in this process --------------------------------------------------------
class Interrupt(Exception):
    """Stands for a crash in the in-process tests."""


class StopAtStep(L.Callback):
    """Records ``(step, the batch's tasks)`` of every training batch; raises :class:`Interrupt` when
    the batch after optimisation step ``step`` starts (its checkpoint is on disk by then)."""

    def __init__(self, step: int | None) -> None:
        self.step = step
        self.seen: list[tuple[int, list]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise Interrupt
        self.seen.append((trainer.global_step, batch.classes.tolist()))


def noisy(image: torch.Tensor) -> torch.Tensor:
    """A training transform that draws from torch's, NumPy's and Python's global generators."""
    jitter = 0.01 * float(np.random.rand()) + 0.01 * random.random()
    return image + 0.1 * torch.randn_like(image) + jitter


def fit_in_process(root: Path, stop_at=None, ckpt_path=None, every_n_train_steps=1, seed=0):
    """Fit the tiny learner for ``EPOCHS`` epochs: its parameters, optimizer state and episodes."""
    L.seed_everything(seed, verbose=False)
    dm = TinyDataModule(**DATA, train_transform=noisy)
    model = MetaLearnerModule(Conv4(1, hidden=4, image_size=16), ProtoNet(), ways=3)
    stop = StopAtStep(stop_at)
    checkpoint = ModelCheckpoint(
        dirpath=root / "checkpoints", every_n_train_steps=every_n_train_steps, save_last=True
    )
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=EPOCHS, default_root_dir=root, logger=False,
        enable_progress_bar=False,
        enable_model_summary=False, inference_mode=False, callbacks=[stop, checkpoint],
    )  # fmt: skip
    try:
        trainer.fit(model, dm, ckpt_path=ckpt_path)
    except Interrupt:
        return None
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    params = {k: v.clone() for k, v in model.state_dict().items()}
    return params, trainer.optimizers[0].state_dict(), stop.seen


def identical(a, b) -> bool:
    """Parameters and optimizer states equal bit for bit."""
    (params_a, optim_a, *_), (params_b, optim_b, *_) = a, b
    same = params_a.keys() == params_b.keys()
    same = same and all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    states_a, states_b = optim_a["state"], optim_b["state"]
    same = same and states_a.keys() == states_b.keys()
    for key in states_a if same else ():
        for name, value in states_a[key].items():
            other = states_b[key][name]
            same = same and (
                torch.equal(value, other) if torch.is_tensor(value) else value == other
            )
    return same


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return fit_in_process(tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.parametrize(
    ("stop_at", "every_n_train_steps"),
    [(1, 1), (4, 1), (3, 1), (4, None)],
    ids=["mid-epoch-0", "mid-epoch-1", "after-the-last-batch-of-epoch-0", "from-the-epoch-0-end"],
)
def test_an_interrupted_run_resumes_to_the_same_parameters(
    tmp_path, uninterrupted, stop_at, every_n_train_steps
):
    assert fit_in_process(tmp_path, stop_at, every_n_train_steps=every_n_train_steps) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    resumed_at = stop_at if every_n_train_steps else STEPS_PER_EPOCH
    assert saved["global_step"] == resumed_at
    resumed = fit_in_process(tmp_path, ckpt_path=last, every_n_train_steps=every_n_train_steps)
    assert resumed[2] == uninterrupted[2][resumed_at:]  # the remaining episodes, in order
    assert identical(resumed, uninterrupted)


@pytest.mark.parametrize("strip", ["loader position", "random states", "nothing (control)"])
def test_resuming_needs_the_loader_position_and_the_random_states(tmp_path, uninterrupted, strip):
    """The comparison above is sensitive: drop either part of the state and the run ends elsewhere."""
    fit_in_process(tmp_path, stop_at=4)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    if strip == "loader position":
        del checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    elif strip == "random states":
        del checkpoint["TinyDataModule"]["random_states"]
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    resumed = fit_in_process(tmp_path, ckpt_path=tmp_path / "edited.ckpt")
    assert identical(resumed, uninterrupted) == (strip == "nothing (control)")


def test_a_different_seed_ends_elsewhere(tmp_path, uninterrupted):
    assert not identical(fit_in_process(tmp_path, seed=1), uninterrupted)


class ValidationScores(L.Callback):
    """Records ``(global step, val/acc)`` at the end of every validation."""

    def __init__(self) -> None:
        self.scores: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.scores.append((trainer.global_step, float(trainer.callback_metrics["val/acc"])))


@pytest.mark.parametrize("checkpoint_class", [BestAndLastCheckpoint, ModelCheckpoint])
def test_mid_epoch_checkpoints_keep_best_on_the_validated_model(tmp_path, checkpoint_class):
    """``every_n_train_steps`` writes last.ckpt every step; best.ckpt is still the model that
    validation scored. The control, Lightning's own callback, moves top-k saving to the training
    steps: it never saves the last epoch's score, and keeps a stale best."""
    L.seed_everything(0, verbose=False)
    scores = ValidationScores()
    checkpoint = checkpoint_class(
        dirpath=tmp_path, filename="best", monitor="val/acc", mode="max", save_last=True,
        every_n_train_steps=1,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
        enable_model_summary=False, inference_mode=False, callbacks=[scores, checkpoint],
    )  # fmt: skip
    model = MetaLearnerModule(Conv4(1, hidden=4, image_size=16), ProtoNet(), ways=3)
    trainer.fit(model, TinyDataModule(**{**DATA, "val_episodes": 8}))
    steps = [step for step, _ in scores.scores]
    assert steps == [3, 6, 9]
    best_step, best_score = max(scores.scores, key=lambda s: (s[1], -s[0]))
    saved = torch.load(tmp_path / "best.ckpt", weights_only=True)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["global_step"] == 9
    if checkpoint_class is BestAndLastCheckpoint:
        assert saved["global_step"] == best_step and checkpoint.best_model_score == best_score
    else:  # the scores of this seed rise: the last epoch's best is missed
        assert best_step == 9 and checkpoint.best_model_score < best_score
        assert saved["global_step"] not in steps[1:]


def test_a_resumed_checkpoint_folder_spelt_differently_keeps_its_best(tmp_path, monkeypatch):
    """The stored folder is compared as a real path, not as a string (relative vs absolute)."""
    callback = BestAndLastCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/acc")
    monkeypatch.chdir(tmp_path)
    state = {
        "dirpath": "checkpoints", "best_model_score": torch.tensor(0.75),
        "best_model_path": "checkpoints/best.ckpt", "best_k_models": {"checkpoints/best.ckpt": 0.75},
        "last_model_path": "checkpoints/last.ckpt", "kth_best_model_path": "", "kth_value": 0.75,
    }  # fmt: skip
    callback.load_state_dict(state)
    assert callback.best_model_score == 0.75 and callback.last_model_path == "checkpoints/last.ckpt"
    plain = ModelCheckpoint(dirpath=tmp_path / "checkpoints", monitor="val/acc")
    with pytest.warns(UserWarning, match="dirpath has changed"):
        plain.load_state_dict(state)
    assert plain.best_model_score is None  # the control: Lightning drops the score


# -- real processes, real SIGKILL --------------------------------------------------------------------
class KillAtStep(L.Callback):
    """SIGKILL this process when the batch after optimisation step ``step`` starts."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def hooked_main(argv: list[str]) -> int:
    """``python tests/test_resume.py [--kill STAGE:STEP] [--metrics PATH] -- <metakd args>``.

    The ``metakd`` command with test-only hooks: ``--kill fit:K`` (any ``Trainer.fit``) or
    ``--kill <stage>:K`` (the pipeline stage whose folder is ``<stage>``) SIGKILLs the process when
    the batch after step ``K`` starts; ``--kill report:0`` right after the report stage has written
    its files. ``--metrics PATH`` tests the fitted model after ``fit`` and writes the final
    validation and test metrics to ``PATH`` as JSON.
    """
    split = argv.index("--")
    hooks, args = argv[:split], argv[split + 1 :]
    kill = hooks[hooks.index("--kill") + 1] if "--kill" in hooks else None
    metrics = Path(hooks[hooks.index("--metrics") + 1]) if "--metrics" in hooks else None
    stage, _, step = (kill or "").partition(":")
    fit = L.Trainer.fit

    @functools.wraps(fit)  # LightningCLI reads fit's signature for the `fit` subcommand's arguments
    def hooked_fit(trainer, *fit_args, **fit_kwargs):
        if stage in ("fit", Path(trainer.default_root_dir).name):
            trainer.callbacks.append(KillAtStep(int(step)))
        result = fit(trainer, *fit_args, **fit_kwargs)
        if metrics is not None:
            final = {k: float(v) for k, v in trainer.callback_metrics.items()}
            tested = trainer.test(trainer.lightning_module, datamodule=trainer.datamodule)
            metrics.write_text(json.dumps({**final, **tested[0]}, indent=2))
        return result

    L.Trainer.fit = hooked_fit
    if stage == "report":
        import lightning_metakd.report as report

        compare = report.compare

        def compare_then_die(*compare_args, **compare_kwargs):
            compare(*compare_args, **compare_kwargs)
            os.kill(os.getpid(), signal.SIGKILL)

        report.compare = compare_then_die
    from lightning_metakd.cli import main

    return main(args)


Job = tuple[list[str], Path, tuple[str, ...]]  # metakd arguments, working folder, hooks


def metakd(*jobs: Job) -> list[subprocess.CompletedProcess]:
    """Run the ``metakd`` jobs as processes at the same time (they are independent: most of each
    one's time is starting Python and importing Lightning); their results, in order."""
    env = {
        **os.environ, "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        # This checkout's code, whichever lightning-metakd the environment has installed.
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
    }  # fmt: skip
    with contextlib.ExitStack() as outputs:
        running = []
        for args, cwd, hooks in jobs:
            command = [sys.executable, str(TESTS / "test_resume.py"), *hooks, "--", *args]
            out = outputs.enter_context(tempfile.TemporaryFile("w+"))
            err = outputs.enter_context(tempfile.TemporaryFile("w+"))
            process = subprocess.Popen(command, stdout=out, stderr=err, cwd=cwd, env=env)
            running.append((process, out, err))
        done = []
        for process, out, err in running:
            process.wait()
            out.seek(0), err.seek(0)
            result = (process.args, process.returncode, out.read(), err.read())
            done.append(subprocess.CompletedProcess(*result))
    return done


def learner_config(hidden: int) -> dict:
    return {
        "class_path": "lightning_metakd.modules.MetaLearnerModule",
        "init_args": {
            "backbone": {
                "class_path": "lightning_metakd.models.Conv4",
                "init_args": {"in_channels": 1, "hidden": hidden, "image_size": 16},
            },
            "algorithm": {"class_path": "lightning_metakd.algorithms.ProtoNet"},
            "ways": 3,
            "optimizer": {"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01}},
        },
    }


def fit_config(root: Path) -> dict:
    """A `metakd fit` config: the tiny data, a checkpoint after every step, logs under ``root``."""
    return {
        "seed_everything": 0,
        "model": learner_config(hidden=4),
        "data": {"class_path": "conftest.TinyDataModule", "init_args": DATA},
        "trainer": {
            "max_epochs": EPOCHS, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root / "runs"), "name": "tiny", "default_hp_metric": False},
            },
        },
        "checkpoint": {"dirpath": str(root / "checkpoints"), "every_n_train_steps": 1},
    }  # fmt: skip


def final_checkpoint(path: Path) -> dict:
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == EPOCHS * STEPS_PER_EPOCH
    return checkpoint


def same_training_state(a: dict, b: dict) -> bool:
    """Bit-identical parameters and Adam state of two final checkpoints."""
    params = a["state_dict"].keys() == b["state_dict"].keys() and all(
        torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items()
    )
    (optim_a,), (optim_b,) = a["optimizer_states"], b["optimizer_states"]
    return params and identical(({}, optim_a), ({}, optim_b))


@pytest.mark.slow
def test_fit_killed_mid_epoch_resumes_to_the_same_parameters_and_metrics(tmp_path):
    runs = {}
    for name in ("uninterrupted", "killed", "control"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "fit.yaml").write_text(yaml.safe_dump(fit_config(tmp_path / name)))
        runs[name] = ["fit", "--config", str(tmp_path / name / "fit.yaml")]
    # Killed when step 5 starts: 4 of 6 steps done, 1 of the 3 batches of epoch 1.
    reference, killed = metakd(
        (runs["uninterrupted"], tmp_path, ("--metrics", "metrics.json")),
        (runs["killed"], tmp_path, ("--kill", "fit:4")),
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 4 and state["epoch"] == 1
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 1}
    ]
    # The control resumes the same kill without the loader's position (a plain DataLoader).
    (tmp_path / "control" / "checkpoints").mkdir()
    del state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    torch.save(state, tmp_path / "control" / "checkpoints" / "killed.ckpt")

    resumed, control = metakd(
        ([*runs["killed"], "--ckpt_path", str(last)], tmp_path, ("--metrics", "resumed.json")),
        (
            [*runs["control"], "--ckpt_path", str(tmp_path / "control/checkpoints/killed.ckpt")],
            tmp_path, ("--metrics", "control.json"),
        ),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert control.returncode == 0, control.stderr[-3000:]

    expected = final_checkpoint(tmp_path / "uninterrupted" / "checkpoints" / "last.ckpt")
    assert same_training_state(final_checkpoint(last), expected)
    assert not same_training_state(
        final_checkpoint(tmp_path / "control" / "checkpoints" / "last.ckpt"), expected
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/acc", "val/loss", "test/acc", "test/acc_ci95", "test/loss"} <= metrics.keys()
    assert json.loads((tmp_path / "resumed.json").read_text()) == metrics  # exactly equal
    control_metrics = json.loads((tmp_path / "control.json").read_text())
    assert control_metrics["val/loss"] != metrics["val/loss"]


def checkpoint_state(path: Path) -> dict:
    """The ``BestAndLastCheckpoint`` state inside a checkpoint file."""
    callbacks = torch.load(path, weights_only=True)["callbacks"]
    (state,) = (v for k, v in callbacks.items() if k.startswith("BestAndLastCheckpoint"))
    return state


@pytest.mark.slow
def test_a_killed_fit_resumes_in_its_own_folder_with_its_best(tmp_path):
    """`metakd fit` killed mid-epoch 1 and resumed with ``--ckpt_path last`` stays in
    ``version_0``: the best.ckpt of epoch 0 and its score carry over and the final best is the
    uninterrupted run's (#15 §3). Checkpoints go where the logger says (no ``checkpoint.dirpath``),
    every step (``every_n_train_steps``)."""
    configs = {}
    for name in ("uninterrupted", "killed"):
        config = fit_config(tmp_path / name)
        config["checkpoint"] = {"every_n_train_steps": 1}
        (tmp_path / name).mkdir()
        configs[name] = tmp_path / name / "fit.yaml"
        configs[name].write_text(yaml.safe_dump(config))
    reference, killed = metakd(
        (["fit", "--config", str(configs["uninterrupted"])], tmp_path, ()),
        (["fit", "--config", str(configs["killed"])], tmp_path, ("--kill", "fit:4")),
    )
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "killed" / "runs" / "tiny" / "version_0"
    at_kill = checkpoint_state(run / "checkpoints" / "last.ckpt")
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert at_kill["best_model_score"] is not None  # epoch 0's validation chose a best.ckpt
    assert at_kill["best_model_path"] == str(run / "checkpoints" / "best.ckpt")

    (resumed,) = metakd((["fit", "--config", str(configs["killed"]), "--ckpt_path", "last"],
                         tmp_path, ()))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert f"metakd fit: --ckpt_path last is {last}" in resumed.stderr
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # the curves go on in one run
    final = checkpoint_state(last)
    expected_run = tmp_path / "uninterrupted" / "runs" / "tiny" / "version_0"
    expected = checkpoint_state(expected_run / "checkpoints" / "last.ckpt")
    assert final["best_model_path"] == str(run / "checkpoints" / "best.ckpt")
    assert torch.equal(final["best_model_score"], expected["best_model_score"])
    assert final["best_model_score"] >= at_kill["best_model_score"]
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)
    expected_best = torch.load(expected_run / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["global_step"] == expected_best["global_step"] in (3, 6)  # a validated model
    assert same_training_state(final_checkpoint(last), final_checkpoint(
        expected_run / "checkpoints" / "last.ckpt"))  # fmt: skip


# -- the pipeline, killed in each stage ---------------------------------------------------------------
STAGES = ("teacher", "student_baseline", "distill", "report")


def pipeline_config(folder: Path) -> Path:
    """A tiny pipeline in ``folder`` (runs in ``folder/runs``): Conv4-8 teacher, Conv4-4 students."""
    data = {"class_path": "conftest.TinyDataModule", "init_args": DATA}
    trainer = {"max_epochs": EPOCHS, "enable_progress_bar": False, "enable_model_summary": False}
    teacher = {"seed_everything": 0, "model": learner_config(8), "data": data, "trainer": trainer}
    baseline = {**teacher, "model": learner_config(4)}
    student = learner_config(4)["init_args"]
    distill = {
        **teacher,
        "model": {
            "class_path": "lightning_metakd.modules.DistillationModule",
            "init_args": {
                "teacher": "set by the pipeline",
                "student_backbone": student["backbone"],
                "student_algorithm": student["algorithm"],
                "ways": 3,
                "init_from_teacher": True,
                "optimizer": student["optimizer"],
            },  # fmt: skip
        },
    }
    for name, config in (("teacher", teacher), ("baseline", baseline), ("distill", distill)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    pipeline = {
        "name": "tiny", "run_dir": str(folder / "runs"), "threads": 1,
        "teacher": "teacher.yaml", "student_baseline": "baseline.yaml", "distill": "distill.yaml",
        "report": {"warmup": 0, "repeats": 1},
    }  # fmt: skip
    (folder / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    return folder / "pipeline.yaml"


def files(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``folder``: its modification time (ns) and SHA-256."""
    return {
        str(p.relative_to(folder)): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest(),
        )
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def report_numbers(run_dir: Path) -> list[dict]:
    """The report's rows without latency (a timing, not a result of training)."""
    rows = json.loads((run_dir / "report.json").read_text())
    return [{k: v for k, v in row.items() if k != "latency_ms"} for row in rows]


def kill_point(stage: str) -> str:
    """Training stages die when step 5 of 6 starts (after their epoch-0 checkpoint); the report
    right after writing report.{json,md,png}, before its done.json."""
    return f"{stage}:{0 if stage == 'report' else 4}"


@pytest.fixture(scope="module")
def killed_pipelines(tmp_path_factory) -> dict:
    """An uninterrupted pipeline and, for each stage, one killed inside that stage and rerun.

    Returns ``{"reference": report numbers, stage: {"killed", "rerun", "run_dir", "finished",
    "markers"}}``, where ``finished``/``markers`` snapshot the stages that were done before the rerun.
    """
    folders = {name: tmp_path_factory.mktemp(name) for name in ("reference", *STAGES)}
    commands = {
        name: ["pipeline", "--config", str(pipeline_config(folder))]
        for name, folder in folders.items()
    }
    first = metakd(
        (commands["reference"], folders["reference"], ()),
        *((commands[s], folders[s], ("--kill", kill_point(s))) for s in STAGES),
    )
    assert first[0].returncode == 0, first[0].stderr[-3000:]
    out: dict = {"reference": report_numbers(folders["reference"] / "runs")}
    for stage, killed in zip(STAGES, first[1:], strict=True):
        run_dir = folders[stage] / "runs"
        done = [s for s in STAGES if (run_dir / s / "done.json").is_file()]
        out[stage] = {
            "killed": killed, "run_dir": run_dir,
            "finished": {s: files(run_dir / s) for s in done},
            "markers": {s: json.loads((run_dir / s / "done.json").read_text()) for s in done},
            "killed_stage_files": files(run_dir / stage) if (run_dir / stage).is_dir() else {},
            "folders": [s for s in STAGES if (run_dir / s).is_dir()],
        }  # fmt: skip
    reruns = metakd(*((commands[s], folders[s], ()) for s in STAGES))
    for stage, rerun in zip(STAGES, reruns, strict=True):
        out[stage]["rerun"] = rerun
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_pipeline_killed_in_a_stage_reruns_that_stage_only(killed_pipelines, stage):
    run = killed_pipelines[stage]
    killed, rerun, run_dir = run["killed"], run["rerun"], run["run_dir"]
    index = STAGES.index(stage)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert f"stage {index + 1}/4: {stage} (new)" in killed.stdout  # it never ran before
    assert list(run["finished"]) == list(STAGES[:index])  # killed in `stage`, not before
    if stage != "report":  # a half-trained stage, with a checkpoint that must not be reused
        assert "checkpoints/last.ckpt" in run["killed_stage_files"]
    assert "done.json" not in run["killed_stage_files"]
    assert not set(run["folders"]) & set(STAGES[index + 1 :])  # later stages never started

    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for i, name in enumerate(STAGES, start=1):
        if name in run["finished"]:
            expected = f"stage {i}/4: {name} skipped (finished; done.json)"
        elif name == stage:
            expected = f"stage {i}/4: {name} (not finished)"
        else:
            expected = f"stage {i}/4: {name} ("
        assert expected in rerun.stdout, rerun.stdout
    for name, before in run["finished"].items():
        assert files(run_dir / name) == before  # not rerun, not touched, nothing added
        assert json.loads((run_dir / name / "done.json").read_text()) == run["markers"][name]
    for name in STAGES[index:]:
        assert (run_dir / name / "done.json").is_file()
    assert report_numbers(run_dir) == killed_pipelines["reference"]


if __name__ == "__main__":
    sys.exit(hooked_main(sys.argv[1:]))
