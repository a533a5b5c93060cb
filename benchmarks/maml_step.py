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
then ``--repeats`` steps each, the order rotated every step — so the steps they are compared by
share the machine's conditions (on a shared machine single runs move by ±15%). That is one round;
``--rounds`` rounds each start a fresh process per malloc setting, back to back.

- "speed vs l2l, same malloc": learn2learn's step time over ours, paired step by step within a
  process: the algorithms compared under the same allocator.
- "speed vs l2l with default malloc": per round, learn2learn's median step under glibc's default
  malloc (as its users run it) over this row's median step in the same round: our default path
  as shipped (``MetaLearnerModule.setup`` tunes malloc on CPU, ``tune_cpu_allocator``) against
  learn2learn as documented. Both as median and interquartile range; > 1 is faster.
- ``ours-vmap`` runs in a process of its own under the shipped setting (its gigabytes of
  allocations move glibc's adaptive thresholds for everything else in the process); its ratios
  are ratios of medians.

Peak memory: each implementation in fresh processes (a warm-up step and one more; the median of
``--memory-runs``), so the peak is its own: on CPU the rise of ``ru_maxrss`` over the value after
setup (it moves by ±15 MB between identical runs), on CUDA ``torch.cuda.max_memory_allocated``.
Results: a Markdown table on stdout and JSON in ``--out``. On CUDA only the default malloc runs.

Usage::

    python benchmarks/maml_step.py                 # full run, CPU
    python benchmarks/maml_step.py --device cuda
    python benchmarks/maml_step.py --quick         # smoke run: tiny meta-batch, short rounds
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


def _ratio_stats(ratios: list[float]) -> dict:
    """Median and interquartile range of ratios (> 1: faster than learn2learn)."""
    ratios = sorted(ratios)
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "iqr": [quartiles[0], quartiles[-1]],
            "values": ratios}  # fmt: skip


def summarise(
    config: dict,
    rounds: list[dict[str, dict[str, list[float]]]],
    vmap_times: dict[str, list[float]],
    peaks: dict[tuple[str, str], list[float]],
) -> list[dict]:
    """One row per implementation and malloc setting, with speed and memory against learn2learn.

    Args:
        rounds: per round, ``{malloc: {impl: step times}}`` of the processes that timed
            ``ours-loop`` and ``learn2learn`` in turns.
        vmap_times: ``{malloc: step times}`` of ``ours-vmap`` (a process of its own).
        peaks: ``{(impl, malloc): peak MB of each memory run}``.

    ``speed_vs_l2l_same_malloc`` pairs the steps of one process (learn2learn's time over ours);
    ``speed_vs_l2l_default_malloc`` pairs, round by round, the median step of learn2learn in its
    default-malloc process with this row's median step in the process of the same round. For
    ``ours-vmap`` both are ratios of medians over all its steps (not paired).
    """
    results = []
    mallocs = list(rounds[0]) if rounds else list(vmap_times)
    for malloc in mallocs:
        rows = (
            {impl: [t for r in rounds for t in r[malloc][impl]] for impl in rounds[0][malloc]}
            if rounds
            else {}
        )
        if malloc in vmap_times:
            rows["ours-vmap"] = vmap_times[malloc]
        for impl, impl_times in rows.items():
            seconds = statistics.median(impl_times)
            peak_runs = peaks.get((impl, malloc), [])
            result = {
                **{k: v for k, v in config.items() if k not in ("impls", "mode", "malloc")},
                "impl": impl, "malloc": malloc, "seconds_per_step": seconds,
                "steps_per_s": 1 / seconds, "tasks_per_s": config["tasks"] / seconds,
                "times": impl_times,
                "peak_mb": statistics.median(peak_runs) if peak_runs else float("nan"),
                "peak_mb_runs": peak_runs,
            }  # fmt: skip
            l2l_default = peaks.get(("learn2learn", "default"))
            if l2l_default and peak_runs:
                result["memory_vs_l2l_default_malloc"] = result["peak_mb"] / statistics.median(
                    l2l_default
                )
            if impl == "ours-vmap":
                for key, ref in (("same", malloc), ("default", "default")):
                    base = [t for r in rounds for t in r.get(ref, {}).get("learn2learn", [])]
                    if base:
                        result[f"speed_vs_l2l_{key}_malloc"] = {
                            "median": statistics.median(base) / seconds, "paired": False,
                        }  # fmt: skip
            elif "learn2learn" in rows:
                same = [
                    b / t
                    for r in rounds
                    for b, t in zip(r[malloc]["learn2learn"], r[malloc][impl], strict=True)
                ]
                result["speed_vs_l2l_same_malloc"] = {**_ratio_stats(same), "paired": True}
                if "default" in rounds[0]:
                    across = [
                        statistics.median(r["default"]["learn2learn"])
                        / statistics.median(r[malloc][impl])
                        for r in rounds
                    ]
                    result["speed_vs_l2l_default_malloc"] = {
                        **_ratio_stats(across), "paired": True,
                    }  # fmt: skip
            results.append(result)
    return results


def _ratio_cell(ratio: dict | None) -> str:
    if ratio is None:
        return "n/a"
    if not ratio["paired"]:
        return f"{ratio['median']:.2f}x (unpaired)"
    low, high = ratio["iqr"]
    return f"{ratio['median']:.2f}x ({low:.2f}-{high:.2f})"


def table(results: list[dict]) -> str:
    """Markdown table: speed against learn2learn under the same malloc and under its default."""
    lines = [
        "| inner steps | order | implementation | malloc | tasks/s | peak MB "
        "| speed vs l2l, same malloc (IQR) | speed vs l2l with default malloc (IQR) "
        "| memory vs l2l with default malloc |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        memory = r.get("memory_vs_l2l_default_malloc")
        lines.append(
            f"| {r['inner_steps']} | {'first' if r['first_order'] else 'second'} | {r['impl']} | "
            f"{r['malloc']} | {r['tasks_per_s']:.1f} | {r['peak_mb']:.0f} | "
            f"{_ratio_cell(r.get('speed_vs_l2l_same_malloc'))} | "
            f"{_ratio_cell(r.get('speed_vs_l2l_default_malloc'))} | "
            f"{'n/a' if memory is None else f'{memory:.2f}x'} |"
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
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 tasks, 2 short rounds")
    parser.add_argument("--rounds", type=int, default=3, help="timing processes per setting")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--memory-runs", type=int, default=3, help="memory processes per row")
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

    tasks, n_rounds, repeats, memory_runs = (
        (4, 2, 1, 1)
        if args.quick
        else (args.meta_batch_size, args.rounds, args.repeats, args.memory_runs)
    )
    mallocs = args.malloc or (["default", "tuned"] if args.device == "cpu" else ["default"])
    shipped = "tuned" if "tuned" in mallocs else mallocs[0]  # what a user's fit gets
    paired = [impl for impl in args.impl if impl != "ours-vmap"]
    results = []
    for steps in args.inner_steps:
        for first_order in (False, True):
            config = {
                "impls": paired, "mode": "time", "inner_steps": steps,
                "first_order": first_order, "device": args.device, "tasks": tasks,
                "repeats": repeats, "hidden": args.hidden, "ways": 5, "shots": 1,
                "queries": 15, "threads": args.threads,
            }  # fmt: skip
            rounds: list[dict[str, dict[str, list[float]]]] = []
            for r in range(n_rounds if paired else 0):
                order = mallocs if r % 2 == 0 else mallocs[::-1]  # cancels drift within a round
                rounds.append({m: worker({**config, "malloc": m})["times"] for m in order})
            # ours-vmap is timed in a process of its own, under the setting users get: its
            # gigabytes of allocations move glibc's adaptive thresholds for the whole process.
            vmap_times = {}
            if "ours-vmap" in args.impl:
                vmap_config = {**config, "impls": ["ours-vmap"], "malloc": shipped}
                vmap_times[shipped] = worker(vmap_config)["times"]["ours-vmap"]
            peaks: dict[tuple[str, str], list[float]] = {}
            for malloc in mallocs:
                for impl in args.impl:
                    if impl == "ours-vmap" and malloc != shipped:
                        continue
                    runs = 1 if impl == "ours-vmap" else memory_runs
                    peaks[(impl, malloc)] = [
                        worker({**config, "impls": [impl], "mode": "memory", "malloc": malloc})[
                            "peak_mb"
                        ][impl]
                        for _ in range(runs)
                    ]
            for result in summarise({**config, "rounds": n_rounds}, rounds, vmap_times, peaks):
                print(
                    f"{result['impl']:12s} steps={steps} first_order={first_order} "
                    f"malloc={result['malloc']}: {result['tasks_per_s']:.1f} tasks/s, "
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
