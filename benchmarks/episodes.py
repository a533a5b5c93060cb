"""Episode loading speed: ``ClassDataset`` + ``EpisodeSampler`` against learn2learn's ``Taskset``.

Both pipelines read the same in-memory data (``--classes`` x ``--per-class`` random 28x28 ``uint8``
images, made with torch) and deliver the same thing: float images in ``[0, 1]`` as
``support_x [T, N*K, 1, 28, 28]``, ``query_x [T, N*Q, 1, 28, 28]`` with labels ``0..N-1``.

- **ours**: ``ClassDataset`` (uint8 tensor) + ``EpisodeSampler`` (``fixed=False``) + ``DataLoader``
  (``batch_size=T``, ``collate_fn=Episode.from_tasks``, ``num_workers=0``): one iteration of the
  loader is one episode.
- **learn2learn**: ``Taskset(MetaDataset(TensorDataset(images, labels)), [NWays(n=N),
  KShots(k=K+Q), LoadData, RemapLabels], num_tasks=-1)``; each task is ``taskset.sample()``, scaled
  to float (``x.float() / 255``) and split with ``l2l.data.utils.partition_task(x, y, shots=K)``
  (support first, class-major, as learn2learn's examples do); the ``T`` tasks of an episode are
  stacked with ``torch.stack`` so that both sides hand over the same tensors.

What is counted: wall-clock time to produce ``--episodes`` whole episodes (a meta-batch of ``T``
tasks each, ``T`` = 1 and 32), from task sampling to the stacked float tensors, in one process;
nothing else (no model). A run's rate is episodes / time; each cell is the median of ``--runs``
runs after one warm-up episode. ``tasks/s`` = episodes/s x ``T``.

Usage::

    python benchmarks/episodes.py                       # prints a Markdown table, writes JSON
    python benchmarks/episodes.py --runs 7 --out /tmp/episodes.json

Needs learn2learn (``python scripts/install_learn2learn.py``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_metakd.data import ClassDataset, Episode, EpisodeSampler
from lightning_metakd.data.learn2learn import require_learn2learn

#: (ways, shots, queries) of the table's settings; each runs with 1 and 32 tasks per episode.
SETTINGS = [(5, 1, 15), (20, 5, 15)]
META_BATCH_SIZES = [1, 32]


def make_data(classes: int, per_class: int, size: int = 28, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(
        0, 256, (classes * per_class, 1, size, size), generator=g, dtype=torch.uint8
    )
    labels = torch.arange(classes).repeat_interleave(per_class)
    return images, labels


def ours(images, labels, ways, shots, queries, tasks, episodes) -> Callable[[], list[Episode]]:
    dataset = ClassDataset(images, labels, [f"c{i}" for i in range(int(labels.max()) + 1)])
    sampler = EpisodeSampler(dataset, ways, shots, queries, num_tasks=tasks * episodes, seed=0)

    def run() -> list[Episode]:
        sampler.set_epoch(sampler.epoch + 1)
        loader = DataLoader(
            dataset, sampler=sampler, batch_size=tasks, collate_fn=Episode.from_tasks, num_workers=0
        )
        return [(ep.support_x, ep.support_y, ep.query_x, ep.query_y) for ep in loader]

    return run


def learn2learn(images, labels, ways, shots, queries, tasks, episodes) -> Callable[[], list]:
    l2l = require_learn2learn("benchmarks/episodes.py")
    meta = l2l.data.MetaDataset(
        TensorDataset(images, labels), indices_to_labels=dict(enumerate(labels.tolist()))
    )
    transforms = [
        l2l.data.transforms.NWays(meta, ways),
        l2l.data.transforms.KShots(meta, shots + queries),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
    ]
    taskset = l2l.data.Taskset(meta, transforms, num_tasks=-1)
    partition = l2l.data.utils.partition_task

    def one_task():
        x, y = taskset.sample()
        (sx, sy), (qx, qy) = partition(x.float().div_(255.0), y, shots=shots)
        return sx, sy, qx, qy

    def run() -> list:
        out = []
        for _ in range(episodes):
            parts = zip(*(one_task() for _ in range(tasks)), strict=True)
            out.append(tuple(torch.stack(p) for p in parts))
        return out

    return run


def measure(run: Callable[[], list], runs: int, episodes: int) -> tuple[float, list[float], tuple]:
    run()  # warm-up (the first epoch of each pipeline builds lookup tables)
    rates, shapes = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = run()
        rates.append(episodes / (time.perf_counter() - start))
        shapes = tuple((tuple(t.shape), t.dtype) for t in out[0])
    return statistics.median(rates), rates, shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.5, help="target length of one run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/episodes.json"))
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be at least 5 (the table reports medians of >= 5 runs).")
    torch.set_num_threads(args.threads)
    l2l = require_learn2learn("benchmarks/episodes.py")
    images, labels = make_data(args.classes, args.per_class)

    rows = []
    for ways, shots, queries in SETTINGS:
        for tasks in META_BATCH_SIZES:
            build = {"ours": ours, "learn2learn": learn2learn}
            # Size the run from one quick probe so that each run lasts about --seconds.
            probe = ours(images, labels, ways, shots, queries, tasks, 3)
            probe()
            start = time.perf_counter()
            probe()
            episodes = max(5, round(args.seconds * 3 / (time.perf_counter() - start)))
            result = {"ways": ways, "shots": shots, "queries": queries, "tasks": tasks}
            result["episodes_per_run"] = episodes
            shapes = {}
            for name, factory in build.items():
                run = factory(images, labels, ways, shots, queries, tasks, episodes)
                median, rates, shapes[name] = measure(run, args.runs, episodes)
                result[name] = {"episodes_per_s": median, "runs": rates}
            if shapes["ours"] != shapes["learn2learn"]:
                raise RuntimeError(f"The pipelines disagree on shapes: {shapes}")
            result["shapes"] = [list(s) for s, _ in shapes["ours"]]
            result["ratio"] = (
                result["ours"]["episodes_per_s"] / result["learn2learn"]["episodes_per_s"]
            )
            rows.append(result)
            print(
                f"done {ways}-way {shots}-shot T={tasks}: ratio {result['ratio']:.2f}", flush=True
            )

    print()
    print(f"{args.classes} classes x {args.per_class} images 28x28 uint8 in memory; num_workers=0;")
    print(f"median of {args.runs} runs; torch threads={args.threads}.")
    print()
    print("| setting | tasks/episode | ours episodes/s | l2l episodes/s | ours tasks/s | "
          "l2l tasks/s | ours/l2l |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, l = r["ours"]["episodes_per_s"], r["learn2learn"]["episodes_per_s"]
        print(
            f"| {r['ways']}-way {r['shots']}-shot, {r['queries']} queries | {r['tasks']} | "
            f"{o:.1f} | {l:.1f} | {o * r['tasks']:.0f} | {l * r['tasks']:.0f} | {r['ratio']:.2f} |"
        )
    report = {
        "benchmark": "episodes/s: ClassDataset+EpisodeSampler+DataLoader vs learn2learn Taskset",
        "data": {
            "classes": args.classes,
            "per_class": args.per_class,
            "size": 28,
            "dtype": "uint8",
        },
        "runs": args.runs,
        "threads": args.threads,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "learn2learn": l2l.__version__,
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "command": "python benchmarks/episodes.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
