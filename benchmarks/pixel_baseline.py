"""Raw-pixel nearest-centroid accuracy on the KanjiVG default data set: the floor to beat.

Each test episode is classified by the nearest class mean of its support images in raw pixel space
(squared Euclidean distance), the "pixels" baseline of Vinyals et al. 2016 (Matching Networks,
Table 1: Omniglot 41.7% / 63.2% / 26.7% / 42.6% for 5-way 1-shot / 5-way 5-shot / 20-way 1-shot /
20-way 5-shot). It runs on the fixed test episodes of :class:`KanjiDataModule` at its defaults, so
a learned method evaluated with the same ``seed`` sees exactly the same tasks.

Usage::

    python benchmarks/pixel_baseline.py                      # 600 episodes per setting
    python benchmarks/pixel_baseline.py --episodes 100 --out /tmp/pixels.json

Prints a Markdown table and writes the numbers (and the render time if it rendered) as JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lightning_metakd.data import Episode, KanjiDataModule
from lightning_metakd.evaluation import mean_ci95

#: (ways, shots, grouping) of each row of the table.
SETTINGS = [
    (5, 1, "none"),
    (5, 5, "none"),
    (20, 1, "none"),
    (20, 5, "none"),
    (5, 1, "radical"),
    (10, 1, "radical"),
]


def nearest_centroid_accuracy(episode: Episode) -> torch.Tensor:
    """Per-task accuracy ``[T]`` of nearest class mean on flattened pixels."""
    t, n = episode.num_tasks, episode.ways
    support = episode.support_x.flatten(2)  # [T, N*K, D]
    query = episode.query_x.flatten(2)  # [T, N*Q, D]
    centroids = (
        torch.zeros(t, n, support.shape[-1]).index_add_(1, episode.support_y[0], support)
        / episode.shots
    )  # class-major labels are the same in every task
    predictions = torch.cdist(query, centroids).argmin(-1)
    return (predictions == episode.query_y).float().mean(-1)


def evaluate(ways: int, shots: int, grouping: str, args: argparse.Namespace) -> dict:
    datamodule = KanjiDataModule(
        test_ways=ways,
        test_shots=shots,
        test_queries=args.queries,
        test_episodes=args.episodes,
        grouping=grouping,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    datamodule.setup("test")
    accuracies = torch.cat([nearest_centroid_accuracy(ep) for ep in datamodule.test_dataloader()])
    mean, ci95 = mean_ci95(accuracies)
    test = datamodule.splits["test"]
    return {
        "ways": ways,
        "shots": shots,
        "queries": args.queries,
        "grouping": grouping,
        "episodes": len(accuracies),
        "acc": mean,
        "acc_ci95": ci95,
        "test_classes": test.num_classes,
        "test_groups": len(test.groups),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=600, help="fixed test episodes per setting")
    parser.add_argument("--queries", type=int, default=15, help="queries per class")
    parser.add_argument("--seed", type=int, default=0, help="split and episode seed")
    parser.add_argument("--cache-dir", default=None, help="render cache (default: user cache)")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "pixel_baseline.json"
    )
    args = parser.parse_args()

    datamodule = KanjiDataModule(seed=args.seed, cache_dir=args.cache_dir)
    rendered = not datamodule.cache_path.exists()
    start = time.perf_counter()
    datamodule.prepare_data()
    prepare_s = time.perf_counter() - start

    rows = [evaluate(ways, shots, grouping, args) for ways, shots, grouping in SETTINGS]
    render = f"rendered in {prepare_s:.1f} s" if rendered else "cache hit"
    print(f"KanjiVG defaults, raw-pixel nearest centroid, {args.episodes} test episodes, ", end="")
    print(f"seed {args.seed} (prepare_data: {render})\n")
    print("| ways | shots | grouping | accuracy (%) | test classes / groups |")
    print("|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['ways']} | {r['shots']} | {r['grouping']} | {100 * r['acc']:.1f} ± "
            f"{100 * r['acc_ci95']:.1f} | {r['test_classes']} / {r['test_groups']} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "method": "raw-pixel nearest centroid",
        "data": "KanjiDataModule defaults",
        "cache_file": datamodule.cache_path.name,
        "render_s": prepare_s if rendered else None,
        "results": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
