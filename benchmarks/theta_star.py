"""Zero-shot θ*: how well a teacher's sliced state works in a narrower student with NO training.

A meta-trained Conv4 ProtoNet teacher is cut down to Conv4 students by
:func:`~lightning_metakd.distill.transfer.slice_state` under each channel-selection rule, and the
student, loaded with the sliced state and nothing else, is scored on fixed KanjiVG test episodes
(5-way 1-shot, 15 queries per class, every task within one radical group, radicals unseen in
training). Rules: ``l1`` (filter L1 norm, the former rule), ``bn_gamma`` (BatchNorm ``|γ|``),
``random`` (several seeds: the control), ``activation`` (mean ``|a|`` after BN-ReLU on
meta-training images) and ``taylor`` (first-order Taylor importance on the ProtoNet loss of
meta-training episodes). Every rule answers the same episodes, so each is compared with random
channels as a paired per-episode difference (the random reference of an episode is the mean over
the random seeds).

The default teacher is the quickstart Conv4-32 of ``configs/kanji/quickstart/teacher.yaml``,
trained here first (``metakd fit``, about 2 minutes on one core), with students Conv4-8 and
Conv4-16; ``--teacher CKPT`` adds (or, without ``quickstart``, replaces) a trained
MetaLearnerModule checkpoint, sliced to a quarter and a half of its width (Conv4-64 → 16, 32).

Usage::

    python benchmarks/theta_star.py                                   # train the quickstart teacher
    python benchmarks/theta_star.py --teacher quickstart --teacher runs/kanji-protonet/version_0/checkpoints/best.ckpt
    python benchmarks/theta_star.py --teacher teacher.ckpt --episodes 100 --out /tmp/theta.json

Prints a Markdown table per teacher and writes every number to
``benchmarks/results/theta_star.json``.
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

from lightning_metakd.algorithms import Learner, ProtoNet
from lightning_metakd.data import Episode, KanjiDataModule
from lightning_metakd.distill.transfer import (
    MeanActivation,
    RandomChannels,
    TaylorImportance,
    slice_state,
)
from lightning_metakd.evaluation import mean_ci95
from lightning_metakd.models import Conv4
from lightning_metakd.modules import load_learner

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "kanji" / "quickstart" / "teacher.yaml"


def train_quickstart_teacher(run_dir: Path) -> Path:
    """``metakd fit --config configs/kanji/quickstart/teacher.yaml`` in a subprocess; its best.ckpt."""
    command = [sys.executable, "-m", "lightning_metakd.cli", "fit", "--config", str(QUICKSTART),
               "--trainer.logger.init_args.save_dir", str(run_dir),
               "--trainer.enable_progress_bar", "false"]  # fmt: skip
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    versions = sorted(
        (run_dir / "kanji-quickstart-teacher").glob("version_*"), key=os.path.getmtime
    )
    print(f"teacher trained in {time.perf_counter() - start:.0f} s", flush=True)
    return versions[-1] / "checkpoints" / "best.ckpt"


def accuracies(learner: Learner, episodes: list[Episode]) -> torch.Tensor:
    """Per-task query accuracy of ``learner`` on every task of ``episodes``: ``[tasks]``."""
    return torch.cat([learner.evaluate(episode).accuracy for episode in episodes])


def student_learner(teacher: Learner, hidden: int, state: dict | None) -> Learner:
    t = teacher.backbone
    backbone = Conv4(in_channels=t.in_channels, hidden=hidden, image_size=t.image_size)
    learner = Learner(backbone, ProtoNet(), ways=teacher.ways)
    if state is not None:
        learner.model.load_state_dict(state)
    return learner


def summary(values: torch.Tensor) -> dict:
    mean, ci95 = mean_ci95(values)
    return {"acc": mean, "acc_ci95": ci95}


def paired(values: torch.Tensor, reference: torch.Tensor) -> dict:
    mean, ci95 = mean_ci95(values - reference)
    return {"diff_vs_random": mean, "diff_vs_random_ci95": ci95}


def evaluate_teacher(path: str, args: argparse.Namespace, test: list[Episode], rules: dict) -> dict:
    teacher = load_learner(path)
    if not isinstance(teacher.backbone, Conv4) or not isinstance(teacher.algorithm, ProtoNet):
        raise SystemExit(f"{path}: this benchmark slices Conv4 ProtoNet teachers.")
    hidden = teacher.backbone.channels
    widths = args.widths or [hidden // 4, hidden // 2]
    start = time.perf_counter()
    teacher_acc = accuracies(teacher, test)
    result = {
        "checkpoint": str(path),
        "teacher": f"Conv4-{hidden} ProtoNet",
        "teacher_eval": summary(teacher_acc),
        "students": [],
    }
    print(f"\n## Conv4-{hidden} teacher ({path}): {100 * result['teacher_eval']['acc']:.2f} ± "
          f"{100 * result['teacher_eval']['acc_ci95']:.2f} % on {len(teacher_acc)} episodes "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    for width in widths:
        rows, per_rule = [], {}
        for name, rule in rules.items():
            student = student_learner(teacher, width, None)
            start = time.perf_counter()
            state = slice_state(teacher.model, student.model, rule)
            select_s = time.perf_counter() - start
            student.model.load_state_dict(state)
            per_rule[name] = accuracies(student, test)
            rows.append({"rule": name, "selection_s": select_s, **summary(per_rule[name])})
        seeds = [n for n in per_rule if n.startswith("random")]
        reference = torch.stack([per_rule[n] for n in seeds]).mean(0)
        for row in rows:
            row.update(paired(per_rule[row["rule"]], reference))
        random_means = torch.tensor([per_rule[n].mean().item() for n in seeds], dtype=torch.float64)
        scratch = accuracies(student_learner(teacher, width, None), test)
        result["students"].append({
            "student": f"Conv4-{width}",
            "rows": rows,
            "random": {"seeds": len(seeds), "mean": random_means.mean().item(),
                       "sd": random_means.std().item()},
            "untrained_student": summary(scratch),
        })  # fmt: skip
        print(f"\n### Conv4-{hidden} → Conv4-{width}, no training after slicing\n")
        print("| rule | accuracy (%) | Δ vs random (points, paired) | selection (s) |")
        print("|---|---:|---:|---:|")
        for row in rows:
            print(f"| {row['rule']} | {100 * row['acc']:.2f} ± {100 * row['acc_ci95']:.2f} | "
                  f"{100 * row['diff_vs_random']:+.2f} ± {100 * row['diff_vs_random_ci95']:.2f} | "
                  f"{row['selection_s']:.2f} |")  # fmt: skip
        r = result["students"][-1]["random"]
        print(f"| random, mean ± sd over {r['seeds']} seeds | {100 * r['mean']:.2f} ± "
              f"{100 * r['sd']:.2f} (sd) | | |")  # fmt: skip
        print(f"| untrained student (no θ*) | {100 * scratch.mean():.2f} | | |", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", action="append", default=None,
                        help="a MetaLearnerModule checkpoint, or 'quickstart' to train one "
                             "(repeatable; default: quickstart)")  # fmt: skip
    parser.add_argument("--widths", type=int, nargs="*", default=None,
                        help="student widths (default: a quarter and a half of the teacher's)")  # fmt: skip
    parser.add_argument("--episodes", type=int, default=600, help="fixed test episodes")
    parser.add_argument("--selection-episodes", type=int, default=20,
                        help="meta-training episodes (20-way 1-shot) for the data-driven rules")  # fmt: skip
    parser.add_argument("--random-seeds", type=int, default=10, help="seeds of the random control")
    parser.add_argument("--seed", type=int, default=0, help="data split and episode seed")
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "theta-star")
    parser.add_argument("--cache-dir", default=None, help="render cache (default: user cache)")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "theta_star.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    started, wall = datetime.now(timezone.utc), time.perf_counter()
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} thread")  # fmt: skip
    print(f"{started.isoformat(timespec='seconds')}, {machine}", flush=True)

    # The quickstart teacher's data, with the test split's fixed within-radical episodes.
    data = KanjiDataModule(
        ways=20, shots=1, queries=5, meta_batch_size=1, test_ways=5, test_shots=1,
        test_queries=15, steps_per_epoch=max(args.selection_episodes, 1), val_episodes=1,
        test_episodes=args.episodes, grouping="radical", seed=args.seed, cache_dir=args.cache_dir,
    )  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    test = list(data.test_dataloader())
    training = list(data.train_dataloader())[: args.selection_episodes]
    images = [x[t] for e in training for x in (e.support_x, e.query_x) for t in range(e.num_tasks)]
    rules = {
        "l1": "l1",
        "bn_gamma": "bn_gamma",
        "activation": MeanActivation(images),
        "taylor": TaylorImportance(training, ProtoNet()),
        **{f"random (seed {s})": RandomChannels(seed=s) for s in range(args.random_seeds)},
    }

    teachers = args.teacher or ["quickstart"]
    results = []
    for teacher in teachers:
        path = train_quickstart_teacher(args.run_dir) if teacher == "quickstart" else Path(teacher)
        results.append(evaluate_teacher(str(path), args, test, rules))

    out = {
        "benchmark": "zero-shot θ*: sliced student accuracy with no training after slicing",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": started.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - wall, 1),
        "machine": machine,
        "data": {
            "source": "KanjiDataModule",
            "grouping": "radical",
            "test_ways": 5,
            "test_shots": 1,
            "test_queries": 15,
            "test_episodes": len(test),
            "seed": args.seed,
            "cache_file": data.cache_path.name,
        },  # fmt: skip
        "selection_data": {
            "train_episodes": len(training),
            "ways": 20,
            "shots": 1,
            "queries": 5,
            "activation_batches": len(images),
        },  # fmt: skip
        "teachers": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out} ({out['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
