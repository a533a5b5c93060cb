"""Scaling on CPU: DDP processes, bf16-mixed precision, and the memory of second-order MAML.

Two measurements, each configuration in a fresh subprocess (so a peak is its own and one run's
threads or caches never leak into the next):

- default (throughput): meta-training steps per second of a Lightning ``Trainer`` on the same
  global work — Conv4-32 MAML (second order, one inner step, inner_lr 0.4), 5-way 1-shot with 15
  queries per class, 28x28 random in-memory images, ``meta_batch_size=8`` tasks per step over all
  processes — for 1 process against 2 DDP processes (gloo) and fp32 against ``bf16-mixed``.
  Each run times ``--steps`` steps after ``--warmup`` steps; the table shows the median over
  ``--repeats`` runs. Every process uses 1 torch thread (``torch.set_num_threads`` and
  ``OMP_NUM_THREADS``), so 2 processes use the 2 cores of a 2-core machine; a last row gives 1
  process 2 threads.
- ``--memory``: the module's real training step — ``MetaLearnerModule.training_step(batch, 0)``,
  ``.backward()`` and an SGD step, outside a ``Trainer`` — of second-order MAML (Conv4-32, 5-way,
  ``--shots`` support and ``--queries`` query images per class of ``--image-size`` pixels) for
  ``--inner-steps`` inner steps and a meta-batch of ``--memory-meta-batch-size`` tasks, in five
  configurations: the loop with one task graph alive at a time (``vmap_tasks=False``, the CPU
  default: :func:`~lightning_metakd.algorithms.memory_bounded_loss`) and the loop with every task
  graph alive until the backward (``task_chunk_size`` = meta-batch: the cost without it), each
  without and with gradient checkpointing of the inner loop (``MAML(checkpoint_steps=True)``),
  and vmap in chunks of ``--chunk-size`` tasks (which cannot checkpoint). Peak memory is the rise
  of ``ru_maxrss`` over the value after setup (the one-off import cost of ``torch.func``
  excluded); steps/s the median of ``--repeats`` steps after one warm-up step; 1 torch thread.

Results: Markdown tables on stdout, JSON in ``--out``.

Usage::

    python benchmarks/scale.py             # throughput, writes benchmarks/results/scale.json
    python benchmarks/scale.py --memory    # memory table, writes .../scale_memory.json
    python benchmarks/scale.py --memory --quick   # smoke run of the memory part
    python benchmarks/scale.py --quick     # smoke run of the throughput part
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THROUGHPUT = (  # (processes, threads per process, precision); the first row is the baseline
    (1, 1, "32-true"),
    (2, 1, "32-true"),
    (1, 1, "bf16-mixed"),
    (2, 1, "bf16-mixed"),
    (1, 2, "32-true"),
)


# -- throughput (Lightning, optionally DDP) -------------------------------------------------------
def train_worker(config: dict) -> None:
    """One Lightning run; rank 0 writes ``{"step_times": [...]}`` to ``config["result"]``.

    Runs in every DDP process: Lightning's launcher starts rank 1 by re-running this script with
    the same arguments.
    """
    import functools

    import lightning as L
    import torch

    from lightning_metakd.algorithms import MAML
    from lightning_metakd.data import ClassDataset, EpisodicDataModule
    from lightning_metakd.models import Conv4
    from lightning_metakd.modules.meta_learner import MetaLearnerModule

    torch.set_num_threads(config["threads"])

    class RandomDataModule(EpisodicDataModule):
        """Random 28x28 grey images in memory: the work, not the data, is what is measured."""

        def build_splits(self) -> dict[str, ClassDataset]:
            g = torch.Generator().manual_seed(self.seed)
            splits = {}
            for split, classes in (("train", 40), ("val", 10), ("test", 10)):
                labels = torch.arange(classes).repeat_interleave(20)
                images = torch.randint(0, 256, (len(labels), 1, 28, 28), generator=g)
                names = [f"{split}{c}" for c in range(classes)]
                splits[split] = ClassDataset(images.to(torch.uint8), labels, names, image_size=28)
            return splits

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())

    torch.manual_seed(0)
    data = RandomDataModule(
        ways=5,
        shots=1,
        queries=15,
        meta_batch_size=8,
        steps_per_epoch=config["warmup"] + config["steps"],
        image_size=28,
    )
    model = MetaLearnerModule(
        Conv4(hidden=32, image_size=28),
        MAML(inner_lr=0.4, inner_steps=1),
        ways=5,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
    )
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=config["processes"],
        strategy="ddp" if config["processes"] > 1 else "auto",
        precision=config["precision"],
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=config["root"],
    )
    trainer.fit(model, data)
    if trainer.global_rank == 0:
        ends = timer.ends[config["warmup"] - 1 :]
        Path(config["result"]).write_text(
            json.dumps({"step_times": [b - a for a, b in zip(ends, ends[1:], strict=False)]})
        )


def throughput(args: argparse.Namespace) -> list[dict]:
    results = []
    for processes, threads, precision in THROUGHPUT:
        per_run = []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as root:
                config = {
                    "processes": processes, "threads": threads, "precision": precision,
                    "steps": args.steps, "warmup": args.warmup, "root": root,
                    "result": str(Path(root) / "result.json"),
                }  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                proc = subprocess.run(
                    [sys.executable, __file__, "--train-worker", json.dumps(config)],
                    capture_output=True,
                    text=True,
                    env=env,
                )
                if proc.returncode != 0:
                    sys.exit(f"{processes} process(es), {precision} failed:\n{proc.stderr[-3000:]}")
                times = json.loads(Path(config["result"]).read_text())["step_times"]
            per_run.append(len(times) / sum(times))
        result = {
            "processes": processes,
            "threads_per_process": threads,
            "precision": precision,
            "steps_per_s": statistics.median(per_run),
            "runs_steps_per_s": per_run,
        }
        print(
            f"{processes} proc x {threads} thr, {precision}: {result['steps_per_s']:.2f} steps/s "
            f"(runs {', '.join(f'{r:.2f}' for r in per_run)})",
            file=sys.stderr,
        )
        results.append(result)
    return results


def throughput_table(results: list[dict]) -> str:
    base = results[0]["steps_per_s"]
    lines = [
        "| processes | torch threads / process | precision | steps/s (median) | tasks/s | "
        f"vs {results[0]['processes']} proc x {results[0]['threads_per_process']} thr fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['processes']} | {r['threads_per_process']} | {r['precision']} | "
            f"{r['steps_per_s']:.2f} | {8 * r['steps_per_s']:.1f} | "
            f"{r['steps_per_s'] / base:.2f}x |"
        )
    return "\n".join(lines)


# -- memory (the module's real training step, no Trainer) -----------------------------------------


def memory_configs(args: argparse.Namespace) -> list[tuple[str, bool, int | None, bool]]:
    """``(name, vmap_tasks, task_chunk_size, checkpoint_steps)`` of each row.

    ``task_chunk_size=None`` is the module's default. vmap has no checkpointed row:
    ``MAML(checkpoint_steps=True)`` refuses vmap.
    """
    return [
        ("loop, 1 task graph at a time (CPU default)", False, None, False),
        ("loop, 1 task graph at a time, checkpointed", False, None, True),
        ("loop, all task graphs at once", False, args.memory_meta_batch_size, False),
        ("loop, all task graphs at once, checkpointed", False, args.memory_meta_batch_size, True),
        (f"vmap, chunks of {args.chunk_size}", True, args.chunk_size, False),
    ]


def memory_worker(config: dict) -> dict:
    """One configuration of the memory table, measured in this process.

    The step is ``MetaLearnerModule.training_step(batch, 0).backward()`` and an SGD step — the
    code a ``Trainer`` runs, without the ``Trainer``.
    """
    import functools
    import warnings

    import torch

    from lightning_metakd.algorithms import MAML
    from lightning_metakd.data import Episode
    from lightning_metakd.models import Conv4
    from lightning_metakd.modules.meta_learner import MetaLearnerModule

    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer: logging is a no-op
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    ways, shots, queries, tasks = 5, config["shots"], config["queries"], config["tasks"]
    size = config["image_size"]
    module = MetaLearnerModule(
        Conv4(1, config["hidden"], image_size=size),
        MAML(
            inner_lr=0.4,
            inner_steps=config["inner_steps"],
            checkpoint_steps=config["checkpoint_steps"],
        ),
        ways=ways,
        vmap_tasks=config["vmap_tasks"],
        task_chunk_size=config["task_chunk_size"],
        optimizer=functools.partial(torch.optim.SGD, lr=1e-3),
    )
    optimizer = module.configure_optimizers()
    batch = Episode(
        torch.randn(tasks, ways * shots, 1, size, size),
        torch.arange(ways).repeat_interleave(shots).expand(tasks, -1),
        torch.randn(tasks, ways * queries, 1, size, size),
        torch.arange(ways).repeat_interleave(queries).expand(tasks, -1),
        torch.arange(ways).expand(tasks, -1),
    )
    graphs = module.training_chunk_size(batch)  # task graphs alive together
    assert graphs == (config["task_chunk_size"] or 1)

    def meta_step() -> None:
        optimizer.zero_grad()
        module.training_step(batch, 0).backward()
        optimizer.step()

    # torch.func's first call imports many modules once per process; keep it out of the peak.
    probe = torch.nn.Linear(2, 1)
    torch.func.vmap(
        torch.func.grad(lambda p, x: torch.func.functional_call(probe, p, (x,)).sum()),
        in_dims=(None, 0),
    )(dict(probe.named_parameters()), torch.ones(2, 1, 2))
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    meta_step()  # warm-up
    times = []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        meta_step()
        times.append(time.perf_counter() - start)
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
    return {
        **config,
        "task_graphs_alive": graphs,
        "steps_per_s": 1 / statistics.median(times),
        "peak_mb": peak_mb,
    }


def memory(args: argparse.Namespace) -> list[dict]:
    results = []
    for inner_steps in args.inner_steps:
        for name, vmap_tasks, chunk, checkpoint_steps in memory_configs(args):
            config = {
                "impl": name, "vmap_tasks": vmap_tasks, "task_chunk_size": chunk,
                "checkpoint_steps": checkpoint_steps, "inner_steps": inner_steps,
                "tasks": args.memory_meta_batch_size, "shots": args.shots,
                "queries": args.queries, "image_size": args.image_size,
                "hidden": 32, "threads": args.threads, "repeats": args.repeats,
            }  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-worker", json.dumps(config)],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"{name:44s} inner_steps={inner_steps:2d}: {result['steps_per_s']:.3f} steps/s, "
                f"peak {result['peak_mb']:.0f} MB",
                file=sys.stderr,
            )
            results.append(result)
    return results


def memory_table(results: list[dict]) -> str:
    lines = [
        "| inner steps | training step | vmap_tasks | task_chunk_size | checkpoint_steps | "
        "task graphs alive | peak RSS rise (MB) | steps/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['inner_steps']} | {r['impl']} | {r['vmap_tasks']} | {r['task_chunk_size']} | "
            f"{r['checkpoint_steps']} | {r['task_graphs_alive']} | {r['peak_mb']:.0f} | "
            f"{r['steps_per_s']:.3f} |"
        )
    return "\n".join(lines)


def checkpoint_table(results: list[dict]) -> str:
    """Peak memory and steps/s against inner steps, without → with ``checkpoint_steps``."""
    rows: dict[tuple[int, int], dict[bool, dict]] = {}
    for r in results:
        if not r["vmap_tasks"]:
            rows.setdefault((r["inner_steps"], r["task_graphs_alive"]), {})[
                r["checkpoint_steps"]
            ] = r
    lines = [
        "| inner steps | task graphs alive | peak RSS rise (MB), plain → checkpointed | "
        "steps/s, plain → checkpointed |",
        "|---|---|---|---|",
    ]
    for (steps, graphs), pair in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if len(pair) < 2:
            continue
        plain, ckpt = pair[False], pair[True]
        lines.append(
            f"| {steps} | {graphs} | {plain['peak_mb']:.0f} → {ckpt['peak_mb']:.0f} | "
            f"{plain['steps_per_s']:.3f} → {ckpt['steps_per_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--memory", action="store_true", help="the memory table instead")
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per run")
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 3, 5, 10])
    parser.add_argument("--memory-meta-batch-size", type=int, default=8)
    parser.add_argument("--shots", type=int, default=5, help="support images per class (memory)")
    parser.add_argument("--queries", type=int, default=5, help="query images per class (memory)")
    parser.add_argument("--image-size", type=int, default=28, help="image side (memory)")
    parser.add_argument("--chunk-size", type=int, default=4, help="vmap tasks per chunk")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (memory part)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--train-worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.train_worker:
        train_worker(json.loads(args.train_worker))
        return
    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return
    if args.quick:
        args.repeats, args.steps, args.warmup, args.inner_steps = 1, 3, 1, [1, 3]
        args.memory_meta_batch_size, args.shots, args.queries = 2, 1, 2

    import torch

    results = memory(args) if args.memory else throughput(args)
    name = "scale_memory.json" if args.memory else "scale.json"
    out = args.out or Path(__file__).parent / "results" / name
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if args.memory:
        print(memory_table(results) + "\n\n" + checkpoint_table(results))
    else:
        print(throughput_table(results))


if __name__ == "__main__":
    main()
