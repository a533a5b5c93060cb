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

Timing: ``ours-loop`` and ``learn2learn`` run in one process, in turns — one warm-up step each,
then ``--repeats`` rounds of one step each, the order rotated every round — so the steps of a
round share the machine's conditions (on a shared machine single runs move by ±15%). Their speed
ratio is the median over rounds of the paired ratio (learn2learn's step time over ours; > 1 is
faster), with its interquartile range. ``ours-vmap`` is timed in a process of its own (its
gigabytes of allocations would move glibc's adaptive malloc thresholds for the others too); its
ratio is one of medians. Peak memory: each
implementation in its own fresh process (a warm-up step and one more), so the peak is its own: on
CPU the rise of ``ru_maxrss`` over the value after setup, on CUDA
``torch.cuda.max_memory_allocated``. Results: a Markdown table on stdout and JSON in ``--out``.

malloc: on CPU every configuration runs twice, with glibc malloc's defaults and with the setting
that ``MetaLearnerModule.setup`` applies to CPU runs (``tune_cpu_allocator``: freed activations
are reused instead of page-faulted in again). Both settings speed every implementation in the
process alike, so the paired ratios compare the algorithms; "vs l2l default malloc" compares our
default path as shipped with learn2learn as its users run it.

Usage::

    python benchmarks/maml_step.py                 # full run, CPU
    python benchmarks/maml_step.py --device cuda
    python benchmarks/maml_step.py --quick         # smoke run: tiny meta-batch, two rounds
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


def build_step(impl: str, config: dict):
    """One meta-training step of ``impl`` on fixed random data, as a zero-argument function."""
    import torch
    import torch.nn.functional as F

    from lightning_metakd.algorithms import MAML
    from lightning_metakd.models import Conv4
    from lightning_metakd.models.classifier import Classifier

    device = torch.device(config["device"])
    torch.manual_seed(0)  # the same data and initial weights for every implementation
    ways, shots, queries, tasks = (
        config["ways"],
        config["shots"],
        config["queries"],
        config["tasks"],
    )
    support_x = torch.randn(tasks, ways * shots, 1, 28, 28, device=device)
    query_x = torch.randn(tasks, ways * queries, 1, 28, 28, device=device)
    support_y = torch.arange(ways, device=device).repeat_interleave(shots).expand(tasks, -1)
    query_y = torch.arange(ways, device=device).repeat_interleave(queries).expand(tasks, -1)
    steps, first_order = config["inner_steps"], config["first_order"]

    if impl == "learn2learn":
        import learn2learn as l2l

        model = Classifier(Conv4(1, config["hidden"], image_size=28), ways=ways).to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        maml = l2l.algorithms.MAML(model, lr=0.4, first_order=first_order)

        def meta_step() -> None:
            optimizer.zero_grad()
            for t in range(tasks):
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(support_x[t]), support_y[t]))
                (F.cross_entropy(learner(query_x[t]), query_y[t]) / tasks).backward()
            optimizer.step()

        return meta_step

    import warnings

    from lightning_metakd.data import Episode
    from lightning_metakd.modules import MetaLearnerModule

    warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer attached here
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

    return meta_step


def run_one(config: dict) -> dict:
    """The worker side: time several implementations in turn, or measure one's peak memory.

    ``mode="time"``: every implementation in ``config["impls"]`` runs one warm-up step, then
    ``repeats`` rounds of one step each, the order rotated every round, so each round's steps
    share the machine's conditions and their ratios are paired. ``mode="memory"``: the single
    implementation in ``impls`` runs a warm-up step and one more; the peak is this process's own.
    """
    import torch

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    if config["malloc"] == "tuned":
        from lightning_metakd.modules import tune_cpu_allocator

        if not tune_cpu_allocator():
            raise RuntimeError("--malloc tuned needs glibc (Linux)")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    # torch.func's first call imports ~900 modules (+~160 MB RSS, once per process): keep that
    # one-off cost out of every implementation's peak.
    probe = torch.nn.Linear(2, 1)
    torch.func.grad(lambda p: torch.func.functional_call(probe, p, (torch.ones(1, 2),)).sum())(
        dict(probe.named_parameters())
    )
    impls = config["impls"]
    if config["mode"] == "memory":
        (impl,) = impls
        meta_step = build_step(impl, config)
        baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            baseline_cuda = torch.cuda.memory_allocated()
        for _ in range(2):
            meta_step()
            sync()
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated() - baseline_cuda) / 2**20
        else:
            peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
        return {"peak_mb": {impl: peak}}

    meta_steps = {impl: build_step(impl, config) for impl in impls}
    for meta_step in meta_steps.values():  # warm-up
        meta_step()
        sync()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for round_ in range(config["repeats"]):
        shift = round_ % len(impls)
        for impl in impls[shift:] + impls[:shift]:
            start = time.perf_counter()
            meta_steps[impl]()
            sync()
            times[impl].append(time.perf_counter() - start)
    return {"times": times}


def summarise(
    config: dict, times: dict[str, list[float]], peaks: dict[str, float], paired: list[str]
) -> list[dict]:
    """One result per implementation: median time and speed ratio against learn2learn.

    For the implementations in ``paired`` (timed in turns with learn2learn in one process) the
    ratio ``speed_vs_l2l`` is the median of the rounds' paired ratios, with its IQR; for the
    others, learn2learn's median step time over theirs.
    """
    base = times.get("learn2learn")
    results = []
    for impl, impl_times in times.items():
        seconds = statistics.median(impl_times)
        result = {
            **{k: v for k, v in config.items() if k not in ("impls", "mode")},
            "impl": impl,
            "seconds_per_step": seconds,
            "steps_per_s": 1 / seconds,
            "tasks_per_s": config["tasks"] / seconds,
            "times": impl_times,
            "peak_mb": peaks.get(impl, float("nan")),
        }
        if base is not None and impl in paired:
            # Per round: learn2learn's step time over this implementation's (> 1: faster).
            ratios = sorted(b / t for b, t in zip(base, impl_times, strict=True))
            quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
            result["speed_vs_l2l"] = statistics.median(ratios)
            result["speed_vs_l2l_iqr"] = [quartiles[0], quartiles[-1]]
            result["speed_vs_l2l_rounds"] = ratios
        elif base is not None:  # timed in another process: a ratio of medians, not paired
            result["speed_vs_l2l"] = statistics.median(base) / seconds
        result["paired_with_l2l"] = base is not None and impl in paired
        results.append(result)
    return results


def table(results: list[dict]) -> str:
    """Markdown table: paired speed ratios within a process, and ratios against learn2learn as shipped.

    "vs l2l, same malloc" pairs the rounds of one process (same allocator setting for both);
    "vs l2l default malloc" divides medians of two processes (learn2learn run as its users run
    it, with glibc's defaults) and compares peak memory the same way.
    """
    base = {
        (r["inner_steps"], r["first_order"]): r
        for r in results
        if r["impl"] == "learn2learn" and r["malloc"] == "default"
    }
    lines = [
        "| inner steps | order | implementation | malloc | tasks/s | peak MB "
        "| speed vs l2l, same malloc (IQR) | speed vs l2l default malloc "
        "| memory vs l2l default malloc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ref = base.get((r["inner_steps"], r["first_order"]))
        paired = "n/a"
        if "speed_vs_l2l_iqr" in r:
            low, high = r["speed_vs_l2l_iqr"]
            paired = f"{r['speed_vs_l2l']:.2f}x ({low:.2f}-{high:.2f})"
        elif "speed_vs_l2l" in r:
            paired = f"{r['speed_vs_l2l']:.2f}x (unpaired)"
        speed = f"{r['tasks_per_s'] / ref['tasks_per_s']:.2f}x" if ref else "n/a"
        memory = f"{r['peak_mb'] / ref['peak_mb']:.2f}x" if ref and ref["peak_mb"] > 0 else "n/a"
        lines.append(
            f"| {r['inner_steps']} | {'first' if r['first_order'] else 'second'} | {r['impl']} | "
            f"{r['malloc']} | {r['tasks_per_s']:.1f} | {r['peak_mb']:.0f} | {paired} | {speed} "
            f"| {memory} |"
        )
    return "\n".join(lines)


def worker(config: dict) -> dict:
    """Run :func:`run_one` in a fresh Python process and return its JSON answer."""
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {config} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 tasks, 2 rounds")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per configuration")
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--impl", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument(
        "--malloc",
        nargs="+",
        default=None,
        choices=("default", "tuned"),
        help="glibc malloc settings to run (default: both on CPU, 'default' on CUDA); 'tuned' is "
        "what MetaLearnerModule.setup applies to CPU runs (tune_cpu_allocator)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/maml_step.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(run_one(json.loads(args.worker))))
        return

    tasks, repeats = (4, 2) if args.quick else (args.meta_batch_size, args.repeats)
    mallocs = args.malloc or (["default", "tuned"] if args.device == "cpu" else ["default"])
    results = []
    for steps in args.inner_steps:
        for first_order in (False, True):
            for malloc in mallocs:
                config = {
                    "impls": list(args.impl), "mode": "time", "inner_steps": steps,
                    "first_order": first_order, "malloc": malloc, "device": args.device,
                    "tasks": tasks, "repeats": repeats, "hidden": args.hidden, "ways": 5,
                    "shots": 1, "queries": 15, "threads": args.threads,
                }  # fmt: skip
                # ours-vmap is timed in a process of its own: its gigabytes of allocations move
                # glibc's adaptive thresholds, which would tune malloc for the others' steps too.
                paired = [impl for impl in args.impl if impl != "ours-vmap"]
                times = worker({**config, "impls": paired})["times"] if paired else {}
                if "ours-vmap" in args.impl:
                    times.update(worker({**config, "impls": ["ours-vmap"]})["times"])
                peaks = {
                    impl: worker({**config, "impls": [impl], "mode": "memory"})["peak_mb"][impl]
                    for impl in args.impl
                }
                for result in summarise(config, times, peaks, paired):
                    print(
                        f"{result['impl']:12s} steps={steps} first_order={first_order} "
                        f"malloc={malloc}: {result['tasks_per_s']:.1f} tasks/s, "
                        f"peak {result['peak_mb']:.0f} MB",
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
