"""DDP correctness: 2 CPU processes (gloo), on one node or two, give the numbers of 1 process.

A meta-batch of ``meta_batch_size`` tasks is split over the ranks (rank ``r`` takes tasks ``r::W``);
DDP averages the ranks' gradients, so one optimisation step must move the parameters exactly as one
process over the whole meta-batch does — for second-order MAML (whose outer gradient flows through
``torch.func.grad`` inside the forward), Meta-SGD (its learned inner learning rates too) and
ProtoNet — and for a distillation step (a frozen Conv4-8 ProtoNet teacher, a Conv4-4 ProtoNet
student started from the teacher's sliced θ*, soft labels and a feature term with its learned
projector), where the teacher must stay bit-identical on every rank. Evaluation lists shard
unevenly (an odd number of episodes); ``test/acc`` and ``test/acc_ci95`` must still equal the
single-process values, and no episode may be dropped or seen twice.

The same must hold across nodes: a run on 2 "nodes" of 1 process each (``num_nodes=2``), launched
as a multi-node job is launched without a scheduler — one interpreter per node with
``MASTER_ADDR``, ``MASTER_PORT`` and its ``NODE_RANK``, here both on this machine over loopback —
trains second-order MAML and ProtoNet to the same parameters and the same metrics, on the same
episodes, and Lightning runs it in its own ``LightningEnvironment`` over gloo.

Lightning's ``strategy="ddp"`` launches a node's extra ranks by re-running the current script, so
the training runs in subprocesses that execute this file as a script (``--worker``), one per node;
each rank writes what it saw to a file, and the tests compare the files of a multi-process and a
1-process run. All runs use float64 (``precision="64-true"``) and plain SGD, so any difference
beyond rounding is a bug, not noise.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from conftest import TinyDataModule, run_together

from lightning_metakd.algorithms import MAML, MetaSGD, ProtoNet
from lightning_metakd.distill import FeatureHints, SoftLabels, TaskLoss
from lightning_metakd.models import Conv4
from lightning_metakd.modules import DistillationModule, MetaLearnerModule

ALGORITHMS = {
    "maml": lambda: MAML(inner_lr=0.3, inner_steps=2, inner_steps_test=3),  # second order
    "metasgd": lambda: MetaSGD(inner_lr=0.3, inner_steps=1),
    "protonet": lambda: ProtoNet(),
}
DISTILL = "distill"  # the DistillationModule run, after the meta-learners in the same worker
RUNS = [*ALGORITHMS, DISTILL]
#: How each world is launched: ``(devices per node, num_nodes, runs)``; "1-process" is the reference.
WORLDS = {
    "1-process": (1, 1, RUNS),
    "2-processes": (2, 1, RUNS),
    "2-nodes": (1, 2, ["maml", "protonet"]),
}
#: ``(world, run)`` of every multi-process comparison with the 1-process run.
CASES = [
    pytest.param(world, name, id=f"{world}-{name}")
    for world, (_, _, names) in WORLDS.items()
    if world != "1-process"
    for name in names
]
STEPS = 3  # optimisation steps per run: the first is "one step", all of them "a few steps"
EVAL_EPISODES = 5  # odd: with 2 ranks and 2 tasks per rank batch, rank 0 runs 2 batches, rank 1 one
TOLERANCE = 1e-5

# `{split}/loss` is checked on uneven shards too: Lightning's batch-size-weighted mean for
# `self.log(..., batch_size=n, sync_dist=True)` averages the ranks' integer episode counts with
# truncation (5 episodes over 2 ranks count as 4: a loss 25% too high), so the modules accumulate it
# in a MeanMetric weighted by tasks (`modules/meta_learner.py::evaluation_metrics`).


def data(meta_batch_size: int = 4, **kwargs) -> TinyDataModule:
    kwargs = {"val_episodes": EVAL_EPISODES, "test_episodes": EVAL_EPISODES, **kwargs}
    return TinyDataModule(
        ways=3,
        shots=1,
        queries=2,
        meta_batch_size=meta_batch_size,
        steps_per_epoch=STEPS,
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


def make_module(name: str) -> L.LightningModule:
    """The meta-learner of ``name`` in ``ALGORITHMS``, or the distiller of a tiny teacher."""
    sgd = functools.partial(torch.optim.SGD, lr=0.5)
    torch.manual_seed(0)
    if name in ALGORITHMS:
        return MetaLearnerModule(
            Conv4(hidden=4, image_size=16), ALGORITHMS[name](), 3, optimizer=sgd
        )
    teacher = MetaLearnerModule(Conv4(hidden=8, image_size=16), ProtoNet(), ways=3)
    torch.manual_seed(1)
    return DistillationModule(
        teacher, Conv4(hidden=4, image_size=16), ProtoNet(), ways=3,
        terms=[TaskLoss(), SoftLabels(weight=1.0), FeatureHints(weight=0.5)],
        init_from_teacher=True, optimizer=sgd,
    )  # fmt: skip


def worker(out: Path, devices: int, num_nodes: int = 1, names: Sequence[str] = RUNS) -> None:
    """Fit one epoch and test each module of ``names``; every rank saves ``<name>-rank<r>.pt``.

    Run once per node; ``r`` is the global rank. Each file also records the world Lightning made:
    its cluster environment, the process-group backend and the ranks.
    """
    for name in names:
        model = make_module(name)
        teachers = getattr(model, "teachers", None)
        teacher = teachers[0] if teachers else None
        if teacher is not None:
            teacher_before = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
        recorder = EpisodeRecorder()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=devices,
            num_nodes=num_nodes,
            strategy="ddp" if devices * num_nodes > 1 else "auto",
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
        result = {"params": recorder.params, "seen": recorder.seen, "val": val, "test": test}
        environment = getattr(trainer.strategy, "cluster_environment", None)  # DDP's only
        result["world"] = {
            "environment": type(environment).__name__,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "main_address": environment.main_address if environment is not None else None,
            "world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
        }
        if teacher is not None:
            result["teacher_before"] = teacher_before
            result["teacher_after"] = {k: v.clone() for k, v in teacher.state_dict().items()}
        torch.save(result, out / f"{name}-rank{trainer.global_rank}.pt")


#: Variables by which Lightning would detect a scheduler's environment instead of its own.
SCHEDULER_VARIABLES = ("SLURM_", "TORCHELASTIC_", "LSB_", "LOCAL_RANK", "GROUP_RANK", "RANK")


def node_environment(port: int) -> dict[str, str]:
    """This environment as a node of a loopback-only job: ``MASTER_ADDR=127.0.0.1`` and ``port``.

    Scheduler variables are dropped, so that Lightning picks its ``LightningEnvironment`` even
    inside a SLURM job, and gloo is bound to the loopback interface (``GLOO_SOCKET_IFNAME``).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(SCHEDULER_VARIABLES)}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    loopback = [name for _, name in socket.if_nameindex() if name.startswith("lo")]
    if loopback:
        env["GLOO_SOCKET_IFNAME"] = loopback[0]
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    out: Path, devices: int, num_nodes: int = 1, names: Sequence[str] = RUNS
) -> dict[str, list[dict]]:
    """Run :func:`worker` on ``num_nodes`` nodes of this machine; ``{name: [rank 0, rank 1, ...]}``.

    A node is one fresh interpreter, started as on a cluster without a scheduler: the environment
    of :func:`node_environment` and its ``NODE_RANK``, the same ``num_nodes`` and ``devices``
    flags everywhere; Lightning's launcher on each node starts that node's other ``devices - 1``
    ranks. All nodes start together and are killed together after 300 s.
    """
    out.mkdir()
    env = node_environment(free_port())
    command = [sys.executable, __file__, "--worker", str(out), "--devices", str(devices)]
    command += ["--num-nodes", str(num_nodes), "--runs", *names]
    nodes = run_together(
        [command] * num_nodes,
        [{**env, "NODE_RANK": str(node)} for node in range(num_nodes)],
        timeout=300,
    )
    for node, proc in enumerate(nodes):
        assert proc.returncode == 0, f"node {node}, exit {proc.returncode}:\n{proc.stdout[-4000:]}"
    world = devices * num_nodes
    return {
        name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(world)]
        for name in names
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    """Each world of ``WORLDS`` runs the same global work, once per module, launched when first used."""
    root = tmp_path_factory.mktemp("ddp")

    class Runs(dict):
        def __missing__(self, world: str) -> dict:
            devices, num_nodes, names = WORLDS[world]
            self[world] = launch(root / world, devices, num_nodes, names)
            return self[world]

    return Runs()


@pytest.mark.slow
@pytest.mark.parametrize("world, algorithm", CASES)
def test_ddp_steps_match_one_process(runs, world, algorithm):
    single, ddp = runs["1-process"][algorithm][0], runs[world][algorithm]
    assert len(single["params"]) == len(ddp[0]["params"]) == STEPS
    names = set(single["params"][0])
    if algorithm == "metasgd":
        assert any(n.startswith("learner.algorithm.inner_lrs.") for n in names)
    if algorithm == DISTILL:  # the student, its feature projector (a term), and the frozen teacher
        assert {n.split(".")[0] for n in names} == {"student", "terms", "teachers"}
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
def test_ddp_distillation_moves_student_and_projector_never_the_teacher(runs):
    """Both trained parts move on every rank; the teacher is bit-identical to its initial state."""
    single, ddp = runs["1-process"][DISTILL][0], runs["2-processes"][DISTILL]
    for run in (single, *ddp):
        first, last = run["params"][0], run["params"][-1]
        for part in ("student.", "terms."):
            moved = [(last[n] - first[n]).abs().max().item() for n in first if n.startswith(part)]
            assert moved and max(moved) > 1e-4, part
        before, after = run["teacher_before"], run["teacher_after"]
        assert set(before) == set(after) and len(before) > 0
        for name, value in before.items():
            # float32 before the Trainer's 64-true conversion, exact in float64
            assert torch.equal(after[name], value.double() if value.is_floating_point() else value)
        for step in run["params"]:
            for name, value in step.items():
                if name.startswith("teachers.0."):
                    assert torch.equal(value, after[name.removeprefix("teachers.0.")]), name
    for name, value in single["teacher_after"].items():  # the same teacher on every rank
        for rank in (0, 1):
            assert torch.equal(ddp[rank]["teacher_after"][name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("world, algorithm", CASES)
def test_ddp_evaluation_matches_one_process_on_uneven_shards(runs, world, algorithm):
    single, ddp = runs["1-process"][algorithm][0], runs[world][algorithm]
    for rank in (0, 1):
        for split in ("val", "test"):
            for key in (f"{split}/acc", f"{split}/acc_ci95"):
                assert ddp[rank][split][key] == pytest.approx(single[split][key], abs=1e-9), key
            # Logged values pass through float32 (Lightning's logged-metric state), hence rel=1e-6.
            key = f"{split}/loss"
            assert ddp[rank][split][key] == pytest.approx(single[split][key], rel=1e-6), key
    assert single["test"]["test/acc_ci95"] > 0  # a real spread, not a degenerate constant
    # The shards are uneven: rank 0 holds 3 of the 5 episodes (2 batches), rank 1 holds 2.
    assert [len(ddp[r]["seen"]["test"]) for r in (0, 1)] == [3, 2]


@pytest.mark.slow
@pytest.mark.parametrize("world, algorithm", CASES)
def test_ddp_sees_every_episode_exactly_once(runs, world, algorithm):
    single, ddp = runs["1-process"][algorithm][0], runs[world][algorithm]
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


@pytest.mark.slow
@pytest.mark.parametrize("world", [w for w in WORLDS if w != "1-process"])
def test_ddp_world_is_the_one_lightning_was_asked_for(runs, world):
    """Lightning's own ``LightningEnvironment`` over gloo on loopback, ranks as each launch set them.

    With ``NODE_RANK`` but no ``LOCAL_RANK`` in the environment, no scheduler is detected and each
    node's launcher starts its local ranks; global rank = node rank × devices + local rank.
    """
    devices, num_nodes, names = WORLDS[world]
    for name in names:
        assert [run["world"] for run in runs[world][name]] == [
            {
                "environment": "LightningEnvironment",
                "backend": "gloo",
                "main_address": "127.0.0.1",
                "world_size": devices * num_nodes,
                "global_rank": rank,
                "node_rank": rank // devices,
                "local_rank": rank % devices,
            }
            for rank in range(devices * num_nodes)
        ]


def world_trainer(devices: int, num_nodes: int) -> L.Trainer:
    """A trainer of ``num_nodes × devices`` CPU processes, not launched: this is global rank 0."""
    return L.Trainer(
        accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp", logger=False
    )


@pytest.mark.parametrize(
    "devices, num_nodes, meta_batch_size, per_process",
    [(2, 1, 3, 2), (2, 2, 3, 1), (2, 2, 6, 2), (1, 3, 2, 1)],
    ids=["1x2-of-3", "2x2-of-3", "2x2-of-6", "3x1-of-2"],
)
def test_ddp_meta_batch_not_divisible_by_processes_is_rounded_up_with_a_warning(
    devices, num_nodes, meta_batch_size, per_process
):
    """The warning counts the processes of every node; a meta-batch smaller than them is kept."""
    dm = data(meta_batch_size=meta_batch_size)
    dm.trainer = world_trainer(devices, num_nodes)
    world = devices * num_nodes
    message = (
        f"meta_batch_size={meta_batch_size} does not divide over {world} processes "
        rf"\(num_nodes={num_nodes} × devices={devices}\).*averages {per_process * world} tasks"
    )
    with pytest.warns(UserWarning, match=message):
        dm.setup("fit")  # warns here, before any training
        loader = dm.train_dataloader()
    assert loader.batch_size == per_process and len(loader) == STEPS


@pytest.mark.parametrize("split", ["val", "test"])
def test_fewer_evaluation_episodes_than_processes_is_a_clear_error(split):
    """Lightning would stop only the rank with no episode; this stops every rank, before training."""
    dm = data(**{f"{split}_episodes": 3})
    dm.trainer = world_trainer(devices=2, num_nodes=2)
    message = (
        rf"{split}_episodes=3 is fewer than the 4 processes \(num_nodes=2 × devices=2\).*"
        "at least 4"
    )
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")
    dm = data(**{f"{split}_episodes": 4})  # one episode per process is enough
    dm.trainer = world_trainer(devices=2, num_nodes=2)
    dm.setup("fit")
    assert len(dm.dataloader(split)) == 1


HANGING_NODE = """
import subprocess, sys, time
rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # a local rank
print("child", rank.pid, flush=True)
time.sleep(120)
"""


def test_launch_timeout_kills_every_node_and_what_it_started():
    """Nodes that never finish (e.g. waiting for a peer) are killed with their children at the limit."""
    with pytest.raises(AssertionError, match="Not all finished within 2 s") as failure:
        run_together([[sys.executable, "-c", HANGING_NODE]] * 2, [os.environ] * 2, timeout=2)
    children = [int(pid) for pid in re.findall(r"child (\d+)", str(failure.value))]
    assert len(children) == 2
    for pid in children:  # killed, then reaped by init: gone, or a zombie for a moment
        assert process_ends(pid), f"{pid} still runs 10 s after the launcher killed its group"


def process_ends(pid: int, within: float = 10.0) -> bool:
    """Whether ``pid`` is gone or a zombie within ``within`` seconds.

    SIGKILL is delivered at once, but on a loaded machine the process may still read as running
    (state R) until the kernel schedules its exit, so one look at /proc can come too early.
    """
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + within
    while True:
        try:
            if stat.read_text().split(") ")[1].startswith("Z"):
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


EXIT_PROBE = """
import atexit, sys, tempfile
import torch.distributed as dist
from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule

# Registered first, so it runs last (atexit is last in, first out): after the module's clean-up.
atexit.register(lambda: print("group alive at exit:", dist.is_initialized(), flush=True))
store = dist.FileStore(tempfile.mkstemp()[1], 1)
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
module = MetaLearnerModule(Conv4(hidden=4, image_size=16), ProtoNet(), ways=3)
if sys.argv[1] == "setup":
    module.setup("fit")
"""


@pytest.mark.parametrize("call_setup", [True, False])
def test_module_setup_destroys_a_gloo_group_at_exit(call_setup):
    """A gloo group alive at interpreter finalization can abort a finished run with SIGABRT.

    The control (no ``setup``) shows the probe sees a live group when nobody destroys it.
    """
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, "setup" if call_setup else "none"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 or not call_setup, proc.stderr[-2000:]
    assert f"group alive at exit: {not call_setup}" in proc.stdout, proc.stderr[-2000:]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="DDP test worker (run by tests/test_ddp.py)")
    parser.add_argument("--worker", type=Path, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=RUNS, choices=RUNS)
    args = parser.parse_args()
    worker(args.worker, args.devices, args.num_nodes, args.runs)
