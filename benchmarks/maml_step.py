"""MAML meta-training speed and peak memory: ours (vmap and loop) against learn2learn.

One meta-training step = adapt each of ``meta_batch_size`` tasks on its support set, query loss,
backward through the inner loop, Adam step. Setup: Conv4-64 classifier, 28x28 grey images, 5-way
1-shot with 15 queries per class, meta-batch 32 (Finn et al.'s Omniglot setting); 1 and 5 inner
steps, second and first order.

- ``ours-vmap``: ``MetaLearnerModule(..., vmap_tasks=True).training_step`` — all tasks of the
  meta-batch in one vmapped graph, one backward (the default on GPUs).
- ``ours-loop``: ``MetaLearnerModule(..., vmap_tasks=False).training_step`` — the CPU default: a
  loop over tasks, each task's graph differentiated and freed before the next
  (``memory_bounded_loss``), one backward.
- ``learn2learn``: its documented usage, ``maml.clone()`` + ``adapt(loss)`` per task and a
  backward per task (which frees each task's graph early).

Every configuration runs in a fresh subprocess, so its peak memory is its own: on CPU the rise of
``ru_maxrss`` over the value after setup, on CUDA ``torch.cuda.max_memory_allocated``. Times are
medians over ``--repeats`` steps after one warm-up step. Results: a Markdown table on stdout and
JSON in ``--out``.

Usage::

    python benchmarks/maml_step.py                 # full run, CPU
    python benchmarks/maml_step.py --device cuda
    python benchmarks/maml_step.py --quick         # smoke run: tiny meta-batch, one repeat
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

IMPLEMENTATIONS = ("ours-vmap", "ours-loop", "learn2learn")


def run_one(config: dict) -> dict:
    """Measure one configuration in this process (the worker side)."""
    import torch
    import torch.nn.functional as F

    from lightning_metakd.algorithms import MAML
    from lightning_metakd.models import Conv4
    from lightning_metakd.models.classifier import Classifier

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    torch.manual_seed(0)
    ways, shots, queries, tasks = (
        config["ways"],
        config["shots"],
        config["queries"],
        config["tasks"],
    )
    model = Classifier(Conv4(1, config["hidden"], image_size=28), ways=ways).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    support_x = torch.randn(tasks, ways * shots, 1, 28, 28, device=device)
    query_x = torch.randn(tasks, ways * queries, 1, 28, 28, device=device)
    support_y = torch.arange(ways, device=device).repeat_interleave(shots).expand(tasks, -1)
    query_y = torch.arange(ways, device=device).repeat_interleave(queries).expand(tasks, -1)
    steps, first_order, impl = config["inner_steps"], config["first_order"], config["impl"]

    if impl == "learn2learn":
        import learn2learn as l2l

        maml = l2l.algorithms.MAML(model, lr=0.4, first_order=first_order)

        def meta_step() -> None:
            optimizer.zero_grad()
            for t in range(tasks):
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(support_x[t]), support_y[t]))
                (F.cross_entropy(learner(query_x[t]), query_y[t]) / tasks).backward()
            optimizer.step()

    else:
        import warnings

        from lightning_metakd.data import Episode
        from lightning_metakd.modules import MetaLearnerModule

        warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached here
        torch.manual_seed(0)
        module = MetaLearnerModule(
            Conv4(1, config["hidden"], image_size=28),
            MAML(inner_lr=0.4, inner_steps=steps, first_order=first_order),
            ways=ways,
            vmap_tasks=impl == "ours-vmap",
        ).to(device)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        classes = torch.arange(ways, device=device).expand(tasks, -1)
        episode = Episode(support_x, support_y, query_x, query_y, classes)

        def meta_step() -> None:
            optimizer.zero_grad()
            module.training_step(episode, 0).backward()
            optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # torch.func's first call imports ~900 modules (+~160 MB RSS, once per process): keep that
    # one-off cost out of every implementation's peak.
    probe = torch.nn.Linear(2, 1)
    torch.func.grad(lambda p: torch.func.functional_call(probe, p, (torch.ones(1, 2),)).sum())(
        dict(probe.named_parameters())
    )
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline_cuda = torch.cuda.memory_allocated()
    meta_step()  # warm-up
    sync()
    times = []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        meta_step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {
        **config,
        "seconds_per_step": seconds,
        "steps_per_s": 1 / seconds,
        "tasks_per_s": tasks / seconds,
        "times": times,
    }
    if device.type == "cuda":
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - baseline_cuda) / 2**20
    else:
        result["peak_mb"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb
        ) / 1024
    return result


def table(results: list[dict]) -> str:
    """Markdown table with ratios against learn2learn in the same configuration."""
    base = {(r["inner_steps"], r["first_order"]): r for r in results if r["impl"] == "learn2learn"}
    lines = [
        "| inner steps | order | implementation | tasks/s | steps/s | peak MB | speed vs l2l "
        "| memory vs l2l |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = base.get((r["inner_steps"], r["first_order"]))
        speed = f"{r['tasks_per_s'] / ref['tasks_per_s']:.2f}x" if ref else "n/a"
        memory = f"{r['peak_mb'] / ref['peak_mb']:.2f}x" if ref and ref["peak_mb"] > 0 else "n/a"
        lines.append(
            f"| {r['inner_steps']} | {'first' if r['first_order'] else 'second'} | {r['impl']} | "
            f"{r['tasks_per_s']:.1f} | {r['steps_per_s']:.3f} | {r['peak_mb']:.0f} | {speed} | "
            f"{memory} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 tasks, 1 repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/maml_step.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return

    tasks, repeats = (4, 1) if args.quick else (args.meta_batch_size, args.repeats)
    results = []
    for steps in args.inner_steps:
        for first_order in (False, True):
            for impl in args.impl:
                config = {
                    "impl": impl, "inner_steps": steps, "first_order": first_order,
                    "device": args.device, "tasks": tasks, "repeats": repeats,
                    "hidden": args.hidden, "ways": 5, "shots": 1, "queries": 15,
                    "threads": args.threads,
                }  # fmt: skip
                proc = subprocess.run(
                    [sys.executable, __file__, "--worker", json.dumps(config)],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    print(f"{impl} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                print(
                    f"{impl:12s} steps={steps} first_order={first_order}: "
                    f"{result['tasks_per_s']:.1f} tasks/s, peak {result['peak_mb']:.0f} MB",
                    file=sys.stderr,
                )
                results.append(result)

    import torch

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
