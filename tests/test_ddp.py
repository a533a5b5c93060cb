"""DDP correctness: 2 CPU processes (gloo) give the numbers of 1 process on the same global work.

A meta-batch of ``meta_batch_size`` tasks is split over the ranks (rank ``r`` takes tasks ``r::W``);
DDP averages the ranks' gradients, so one optimisation step must move the parameters exactly as one
process over the whole meta-batch does — for second-order MAML (whose outer gradient flows through
``torch.func.grad`` inside the forward), Meta-SGD (its learned inner learning rates too) and
ProtoNet. Evaluation lists shard unevenly (an odd number of episodes); ``test/acc`` and
``test/acc_ci95`` must still equal the single-process values, and no episode may be dropped or seen
twice.

Lightning's ``strategy="ddp"`` launches the extra rank by re-running the current script, so the
training runs in a subprocess that executes this file as a script (``--worker``); each rank writes
what it saw to a file, and the tests compare the files of a 2-process and a 1-process run. Both
runs use float64 (``precision="64-true"``) and plain SGD, so any difference beyond rounding is a
bug, not noise.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TinyDataModule

from lightning_metakd.algorithms import MAML, MetaSGD, ProtoNet
from lightning_metakd.models import Conv4
from lightning_metakd.modules.meta_learner import MetaLearnerModule

ALGORITHMS = {
    "maml": lambda: MAML(inner_lr=0.3, inner_steps=2, inner_steps_test=3),  # second order
    "metasgd": lambda: MetaSGD(inner_lr=0.3, inner_steps=1),
    "protonet": lambda: ProtoNet(),
}
STEPS = 3  # optimisation steps per run: the first is "one step", all of them "a few steps"
EVAL_EPISODES = 5  # odd: with 2 ranks and 2 tasks per rank batch, rank 0 runs 2 batches, rank 1 one
TOLERANCE = 1e-5

# Until the fix below lands, the logged `{split}/loss` is wrong on uneven evaluation shards:
# Lightning's batch-size-weighted mean for `self.log(..., batch_size=n, sync_dist=True)` averages the
# ranks' integer episode counts with truncation (5 episodes over 2 ranks count as 4, so the loss is
# 25% too high). Patch (in the report of the scale-and-precision work): modules/meta_learner.py
# accumulates `{split}/loss` in a torchmetrics MeanMetric (weight = tasks) and logs it at epoch end.


def data(meta_batch_size: int = 4, **kwargs) -> TinyDataModule:
    return TinyDataModule(
        ways=3,
        shots=1,
        queries=2,
        meta_batch_size=meta_batch_size,
        steps_per_epoch=STEPS,
        val_episodes=EVAL_EPISODES,
        test_episodes=EVAL_EPISODES,
        image_size=16,
        **kwargs,
    )


class EpisodeRecorder(L.Callback):
    """Records which tasks each rank sees (and, on training steps, the parameters after the step).

    A task is identified by its classes and a checksum of its support and query images, so two
    tasks that happen to share classes still differ.
    """

    def __init__(self) -> None:
        self.seen: dict[str, list[tuple[int, tuple]]] = {"train": [], "val": [], "test": []}
        self.params: list[dict[str, torch.Tensor]] = []

    def _record(self, stage: str, batch, batch_idx: int) -> None:
        sums = (
            batch.support_x.flatten(1).double().sum(1),
            batch.query_x.flatten(1).double().sum(1),
        )
        for classes, s, q in zip(batch.classes.tolist(), *sums, strict=True):
            self.seen[stage].append(
                (batch_idx, (tuple(classes), round(s.item(), 6), round(q.item(), 6)))
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._record("train", batch, batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("val", batch, batch_idx)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._record("test", batch, batch_idx)


def worker(out: Path, devices: int) -> None:
    """Fit one epoch and test each algorithm; every rank saves ``<algorithm>-rank<r>.pt``."""
    for name, make_algorithm in ALGORITHMS.items():
        torch.manual_seed(0)
        model = MetaLearnerModule(
            Conv4(hidden=4, image_size=16),
            make_algorithm(),
            ways=3,
            optimizer=functools.partial(torch.optim.SGD, lr=0.5),
        )
        recorder = EpisodeRecorder()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            precision="64-true",
            max_epochs=1,
            num_sanity_val_steps=0,
            callbacks=[recorder],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=out,
        )
        trainer.fit(model, data())
        val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        test = trainer.test(model, data(), verbose=False)[0]
        torch.save(
            {"params": recorder.params, "seen": recorder.seen, "val": val, "test": test},
            out / f"{name}-rank{trainer.global_rank}.pt",
        )


def launch(out: Path, devices: int) -> dict[str, list[dict]]:
    """Run :func:`worker` in a fresh interpreter; returns ``{algorithm: [rank 0, rank 1, ...]}``."""
    out.mkdir()
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", str(out), "--devices", str(devices)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(devices)]
        for name in ALGORITHMS
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    """The 1-process run and the 2-process DDP run of the same global work."""
    root = tmp_path_factory.mktemp("ddp")
    return launch(root / "single", 1), launch(root / "ddp", 2)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_ddp_steps_match_one_process(runs, algorithm):
    single, ddp = runs[0][algorithm][0], runs[1][algorithm]
    assert len(single["params"]) == len(ddp[0]["params"]) == STEPS
    names = set(single["params"][0])
    if algorithm == "metasgd":
        assert any(n.startswith("algorithm.inner_lrs.") for n in names)
    for step in range(STEPS):
        for rank in (0, 1):
            assert set(ddp[rank]["params"][step]) == names
            for n in names:
                a, b = single["params"][step][n], ddp[rank]["params"][step][n]
                assert a.dtype == torch.float64
                torch.testing.assert_close(b, a, rtol=0, atol=TOLERANCE, msg=f"step {step}: {n}")
    # The steps really moved the parameters (so equality is not of two untouched copies).
    moved = [(single["params"][-1][n] - single["params"][0][n]).abs().max().item() for n in names]
    assert max(moved) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_ddp_evaluation_matches_one_process_on_uneven_shards(runs, algorithm):
    single, ddp = runs[0][algorithm][0], runs[1][algorithm]
    for rank in (0, 1):
        for split in ("val", "test"):
            for key in (f"{split}/acc", f"{split}/acc_ci95"):
                assert ddp[rank][split][key] == pytest.approx(single[split][key], abs=1e-9), key
            # The query loss is computed in float32 (meta_loss casts the logits), hence rel=1e-6.
            key = f"{split}/loss"
            assert ddp[rank][split][key] == pytest.approx(single[split][key], rel=1e-6), key
    assert single["test"]["test/acc_ci95"] > 0  # a real spread, not a degenerate constant
    # The shards are uneven: rank 0 holds 3 of the 5 episodes (2 batches), rank 1 holds 2.
    assert [len(ddp[r]["seen"]["test"]) for r in (0, 1)] == [3, 2]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_ddp_sees_every_episode_exactly_once(runs, algorithm):
    single, ddp = runs[0][algorithm][0], runs[1][algorithm]
    for stage in ("train", "val", "test"):
        everything = [task for _, task in single["seen"][stage]]
        union = [task for r in (0, 1) for _, task in ddp[r]["seen"][stage]]
        assert len(everything) == {"train": STEPS * 4, "val": 5, "test": 5}[stage]
        assert len(set(everything)) == len(everything)
        assert Counter(union) == Counter(everything), stage
    # Training batch b of rank 0 and of rank 1 together are the single process's batch b: the
    # condition under which averaging the ranks' gradients equals the one-process meta-gradient.
    for b in range(STEPS):
        batch = {task for i, task in single["seen"]["train"] if i == b}
        shards = {task for r in (0, 1) for i, task in ddp[r]["seen"]["train"] if i == b}
        assert shards == batch


def test_ddp_meta_batch_not_divisible_by_devices_is_a_clear_error():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    dm = data(meta_batch_size=3)
    dm.trainer = trainer
    with pytest.raises(ValueError, match="meta_batch_size.*(divisible|multiple)"):
        dm.setup("fit")
        dm.train_dataloader()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DDP test worker (run by tests/test_ddp.py)")
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("--devices", type=int, required=True)
    args = parser.parse_args()
    worker(args.worker, args.devices)
