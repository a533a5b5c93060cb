#!/usr/bin/env python3
"""Does distillation pay on KanjiVG? Every arm over seeds, paired on the same fixed test episodes.

The successor of ``kanji_ablation.py``: each arm is a config plus overrides, run once per training
seed with :func:`lightning_metakd.seeds.run_seeds` (``metakd sweep``'s engine: a real ``metakd
fit`` + ``test`` in a subprocess per run, resumable), then, seed by seed, every arm's checkpoint
answers the same 600 fixed test episodes in one :func:`lightning_metakd.report.compare` call, so
every difference against the study's reference arm is paired per episode. Tables give the mean ±
sd over seeds of the accuracy and of the paired difference beside the per-seed 95% CI; a gain
counts when it exceeds both.

Studies (``STUDIES``; the teachers are trained once, by their own configs):

- ``main``: the Conv4-16 ProtoNet student alone (``protonet_conv4_16.yaml``, the undistilled
  twin) and the same student distilled from the Conv4-64 ProtoNet teacher (θ* by BN |γ|, soft
  labels, the teacher's embeddings cached under population statistics), each trained 8, 16 and
  32 epochs (StepLR every 3, 3 and 6), the distilled student also 64 (every 12). The 32-epoch
  twin, whose validation accuracy has stopped rising, is the reference of every paired
  difference. Validation accuracy against training time (``docs/results/main_accuracy_vs_time.png``;
  load-free: in twin epochs) shows the arms at every budget.
- ``equal``: the 64-epoch distilled student against the twin given its compute (96 epochs, its
  schedule stretched alike), the reference; the cost of a distillation epoch in twin epochs is
  their per-epoch wall-time ratio, trained side by side.
- ``patient``: the 96-epoch twin against the student distilled on 4 stored views per image
  (``train_views``: the teacher's embeddings of each view cached) for 48 epochs, without views
  for 64, and early-stopped (``knowledge_epochs``: 8 distilled epochs of 90); every arm's epoch
  costs its own wall-time ratio to the twin's.
- ``ablation``: one knowledge source at a time, then combinations, 6 epochs (the configs' schedule).
- ``maml``: MAML-anchored distillation, a Conv4-64 MAML teacher → Conv4-16 MAML student: λ over
  a range (λ = 0 included) against soft labels alone.
- ``vit``: attention distillation on a ViT pair whose teacher clearly beats the student alone.

Usage (teachers first: ``metakd fit --config configs/kanji/protonet.yaml``, ``.../maml.yaml``,
``.../vit_teacher.yaml --trainer.max_epochs 20``)::

    OMP_NUM_THREADS=1 python scripts/kanji_study.py main ablation --jobs 2
    OMP_NUM_THREADS=1 python scripts/kanji_study.py maml --seeds 0 1 2 --out runs/study
    OMP_NUM_THREADS=1 python scripts/kanji_study.py equal --seeds 0 1 2 --jobs 2   # about 85 min
    OMP_NUM_THREADS=1 python scripts/kanji_study.py patient --seeds 0 --jobs 2
    python scripts/kanji_study.py equal --replot       # redraw a finished study's picture
    python scripts/kanji_study.py ablation --smoke     # every arm for 3 steps: do the configs run?
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "kanji"
#: The teachers, where their own configs write them (``metakd fit --config configs/kanji/...``).
TEACHERS = {
    "protonet": "runs/kanji-protonet/version_0/checkpoints/best.ckpt",
    "maml": "runs/kanji-maml/version_0/checkpoints/best.ckpt",
    "vit": "runs/kanji-vit-teacher/version_0/checkpoints/best.ckpt",
}
#: Overrides of ``--smoke``: every arm runs a few steps; the numbers mean nothing.
SMOKE = {
    "trainer.max_epochs": 1,
    "trainer.max_steps": 3,
    "trainer.val_check_interval": 3,  # one validation: the curves have a point
    "data.init_args.val_episodes": 4,
    "data.init_args.test_episodes": 8,
}


def term(name: str, **init_args: Any) -> dict[str, Any]:
    """One entry of ``model.init_args.terms``: ``lightning_metakd.distill.<name>(**init_args)``."""
    return {"class_path": f"lightning_metakd.distill.{name}", "init_args": init_args}


TASK = term("TaskLoss", weight=1.0)
SOFT = term("SoftLabels", weight=1.0, temperature=4.0)
#: The cached teacher: per-image embeddings under population statistics (``distill/cache.py``).
CACHED = {"model.init_args.teacher_normalization": "population"}


@dataclass(frozen=True)
class Arm:
    """One row of a study: a ``metakd fit`` config and its overrides (dotted keys)."""

    key: str  #: its folder under ``<out>/<study>/``
    label: str  #: its name in the tables
    config: str  #: relative to configs/kanji/
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Study:
    """Arms trained with the same seeds and compared on the same test episodes."""

    name: str
    title: str
    arms: tuple[Arm, ...]
    reference: str  #: the key of the arm every paired difference is taken against
    teacher: str  #: a key of TEACHERS: its row in the tables (trained once, not per seed)
    test_ways: tuple[int, ...] = (5,)
    overrides: dict[str, Any] = field(default_factory=dict)  #: for every arm
    curves: bool = False  #: plot validation accuracy against training time
    #: (distilled arm, twin arm) with equal epochs, trained side by side: their wall-time ratio is
    #: the cost of a distillation epoch in twin epochs, the load-free axis of the second panel.
    cost_pair: tuple[str, str] | None = None
    #: Every arm's epoch costs its own per-epoch wall-time ratio to the cost pair's twin (arms
    #: that differ in more than the teacher: views, a cache), not the cost pair's ratio.
    cost_per_arm: bool = False


def _distill(terms: list[dict[str, Any]], init: bool = True, **more: Any) -> dict[str, Any]:
    return {"model.init_args.terms": terms, "model.init_args.init_from_teacher": init, **more}


#: The main study trains a third longer than the configs' 6 epochs (StepLR keeps its step of 3), so
#: that the twin's validation curve has flattened before its budget ends.
LONG = {"trainer.max_epochs": 8, "model.init_args.lr_scheduler.init_args.step_size": 3}
#: The twin trained until it stops rising: four times the distilled arm's epochs, its StepLR
#: schedule stretched to that length (the 16-epoch twin's step of 3 leaves it still rising).
CONVERGED = {"trainer.max_epochs": 32, "model.init_args.lr_scheduler.init_args.step_size": 6}
#: The twin given the 32-epoch distilled arm's compute (32 distillation epochs cost 47 twin epochs
#: at the measured 1.47x), its schedule stretched to it: equal compute for that arm, not only
#: "trained until it stopped rising" (which the 32-epoch twin's decayed learning rate could fake).
MATCHED = {"trainer.max_epochs": 48, "model.init_args.lr_scheduler.init_args.step_size": 9}
#: Twice that again (StepLR step 12), for the distilled student: does it keep gaining where the
#: twin has stopped?
LONGEST = {"trainer.max_epochs": 64, "model.init_args.lr_scheduler.init_args.step_size": 12}
#: The twin given the 64-epoch distilled arm's compute: 64 distillation epochs cost 94 twin epochs
#: at the main study's 1.47x, rounded up to 96 with the same schedule's shape (StepLR every 18).
LONGEST_TWIN = {"trainer.max_epochs": 96, "model.init_args.lr_scheduler.init_args.step_size": 18}
#: Early-stopped distillation (``knowledge_epochs``): 8 distilled epochs (each about 1.2-1.5 twin
#: epochs), then 82 of the task loss alone (a twin epoch each): at most the 96-epoch twin's compute,
#: its StepLR shape.
EARLY_STOPPED = {"trainer.max_epochs": 90, "model.init_args.lr_scheduler.init_args.step_size": 18}
TWIN_96 = Arm(
    "twin-96", "Conv4-16 alone, 96 epochs (StepLR step 18)", "protonet_conv4_16.yaml", LONGEST_TWIN
)
DISTILLED_64 = Arm(
    "distilled-64",
    "Conv4-16 distilled, 64 epochs (StepLR step 12)",
    "distill_protonet.yaml",
    {**CACHED, **LONGEST},
)
#: Views per training image kept fixed (``train_views``), so the teacher's outputs on them are
#: cached: function matching at a cost near distillation without views. 48 epochs draw each of
#: KanjiVG's 89,380 training images 16 times, each of its 4 views 4 times: the teacher embeds a
#: view once (a cold step costs 3.1x the twin's, a warm one 1.05x: benchmarks/distill_step.py).
#: Measured (seed 0, beside other runs): an epoch cost 2.20 twin epochs, 106 in all — the views'
#: own making (about 2.5 ms per image until each is kept) weighs more than the estimate assumed.
STORED_VIEWS = 4
STORED_VIEWS_48 = Arm(
    "distilled-views-48",
    f"Conv4-16 distilled, {STORED_VIEWS} stored views per image, 48 epochs (StepLR step 9)",
    "distill_protonet_augmented.yaml",
    {"data.init_args.train_views": STORED_VIEWS, **MATCHED},
)
STUDIES: dict[str, Study] = {
    s.name: s
    for s in [
        Study(
            "main",
            "Conv4-16 ProtoNet alone vs distilled from Conv4-64, 8 to 64 epochs",
            (
                Arm("twin", "Conv4-16 alone, 8 epochs", "protonet_conv4_16.yaml"),
                Arm(
                    "twin-long",
                    "Conv4-16 alone, 16 epochs",
                    "protonet_conv4_16.yaml",
                    {"trainer.max_epochs": 16},
                ),  # fmt: skip
                Arm(
                    "twin-32",
                    "Conv4-16 alone, 32 epochs (StepLR step 6)",
                    "protonet_conv4_16.yaml",
                    CONVERGED,
                ),  # fmt: skip
                Arm(
                    "twin-48",
                    "Conv4-16 alone, 48 epochs (StepLR step 9)",
                    "protonet_conv4_16.yaml",
                    MATCHED,
                ),  # fmt: skip
                Arm("distilled", "Conv4-16 distilled, 8 epochs", "distill_protonet.yaml", CACHED),
                Arm(
                    "distilled-long",
                    "Conv4-16 distilled, 16 epochs",
                    "distill_protonet.yaml",
                    {**CACHED, "trainer.max_epochs": 16},
                ),  # fmt: skip
                Arm(
                    "distilled-32",
                    "Conv4-16 distilled, 32 epochs (StepLR step 6)",
                    "distill_protonet.yaml",
                    {**CACHED, **CONVERGED},
                ),  # fmt: skip
                DISTILLED_64,
            ),
            reference="twin-32",
            teacher="protonet",
            test_ways=(5, 10),
            overrides=LONG,
            curves=True,
            cost_pair=("distilled", "twin"),
        ),
        Study(
            "equal",
            "Conv4-16 distilled 64 epochs vs alone for the same compute (96 epochs)",
            (
                TWIN_96,
                DISTILLED_64,
            ),
            reference="twin-96",
            teacher="protonet",
            test_ways=(5, 10),
            curves=True,
            cost_pair=("distilled-64", "twin-96"),
        ),
        Study(
            "patient",
            "Conv4-16 distilled 64 epochs, early-stopped, and on stored views vs alone, 96 epochs",
            (
                TWIN_96,
                DISTILLED_64,
                Arm(
                    "distilled-early-90",
                    "Conv4-16 distilled 8 epochs, then alone to 90 (StepLR step 18)",
                    "distill_protonet.yaml",
                    {**CACHED, "model.init_args.knowledge_epochs": 8, **EARLY_STOPPED},
                ),  # fmt: skip
                STORED_VIEWS_48,
            ),
            reference="twin-96",
            teacher="protonet",
            test_ways=(5, 10),
            curves=True,
            cost_pair=("distilled-views-48", "twin-96"),
            cost_per_arm=True,
        ),
        Study(
            "ablation",
            "Conv4-64 ProtoNet → Conv4-16 ProtoNet, one knowledge source at a time, 6 epochs",
            (
                Arm("twin", "alone (undistilled twin)", "protonet_conv4_16.yaml"),
                Arm("theta", "θ* (BN |γ| slice)", "distill_protonet.yaml", _distill([TASK])),
                Arm(
                    "soft",
                    "soft labels",
                    "distill_protonet.yaml",
                    _distill([TASK, SOFT], False, **CACHED),
                ),  # fmt: skip
                Arm(
                    "theta-soft",
                    "θ* + soft labels, transductive teacher",
                    "distill_protonet.yaml",
                    {"model.init_args.teacher_normalization": "transductive"},
                ),  # fmt: skip
                Arm(
                    "theta-soft-cached",
                    "θ* + soft labels, cached teacher",
                    "distill_protonet.yaml",
                    CACHED,
                ),  # fmt: skip
                Arm(
                    "rkd",
                    "θ* + soft + relational (RKD)",
                    "distill_protonet.yaml",
                    _distill([TASK, SOFT, term("RelationalKD", weight=1.0)], **CACHED),
                ),  # fmt: skip
                Arm(
                    "prototypes",
                    "θ* + soft + prototype matching",
                    "distill_protonet.yaml",
                    _distill([TASK, SOFT, term("PrototypeMatching", weight=1.0)], **CACHED),
                ),  # fmt: skip
                Arm("augmented", "θ* + soft, augmented views", "distill_protonet_augmented.yaml"),
            ),
            reference="twin",
            teacher="protonet",
            test_ways=(5,),  # the main study adds 10-way; 5-way keeps the 8 arms × 3 seeds short
        ),
        Study(
            "maml",
            "MAML-anchored distillation, Conv4-64 MAML → Conv4-16 MAML, 3 epochs",
            (
                Arm(
                    "twin",
                    "alone (random init)",
                    "maml.yaml",
                    {"model.init_args.backbone.init_args.hidden": 16},
                ),  # fmt: skip
                Arm("lambda-0", "θ*, λ = 0", "distill_maml.yaml", _distill([TASK])),
                Arm("lambda-0.01", "θ* + anchor λ = 0.01", "distill_maml.yaml"),
                Arm(
                    "lambda-0.1",
                    "θ* + anchor λ = 0.1",
                    "distill_maml.yaml",
                    _distill([TASK, term("ParameterAnchor", weight=0.1)]),
                ),  # fmt: skip
                Arm(
                    "lambda-1",
                    "θ* + anchor λ = 1",
                    "distill_maml.yaml",
                    _distill([TASK, term("ParameterAnchor", weight=1.0)]),
                ),  # fmt: skip
                Arm(
                    "soft", "θ* + soft labels (λ = 0)", "distill_maml.yaml", _distill([TASK, SOFT])
                ),  # fmt: skip
                Arm(
                    "stepwise",
                    "θ* + soft labels at every inner step (StepwiseSoftLabels)",
                    "distill_maml.yaml",
                    _distill([TASK, term("StepwiseSoftLabels", weight=1.0, temperature=4.0)]),
                ),  # fmt: skip
                Arm(
                    "adapted-head",
                    "θ* + the teacher's adapted head (AdaptedHead)",
                    "distill_maml.yaml",
                    _distill([TASK, term("AdaptedHead", weight=1.0)]),
                ),  # fmt: skip
            ),
            reference="lambda-0",
            teacher="maml",
            overrides={
                "trainer.max_epochs": 3,
                "model.init_args.lr_scheduler.init_args.step_size": 2,
            },
        ),
        Study(
            "vit",
            "ViT-64×4 ProtoNet (20 epochs) → ViT-32×2 (5 epochs), attention distillation",
            (
                Arm(
                    "alone",
                    "ViT-32×2 alone",
                    "vit_teacher.yaml",
                    {
                        "model.init_args.backbone.init_args.embed_dim": 32,
                        "model.init_args.backbone.init_args.depth": 2,
                        "model.init_args.backbone.init_args.heads": 2,
                    },
                ),  # fmt: skip
                Arm("attention", "attention distillation", "distill_vit_attention.yaml"),
                Arm(
                    "attention-soft",
                    "attention + soft labels",
                    "distill_vit_attention.yaml",
                    {
                        "model.init_args.terms": [
                            TASK,
                            term("AttentionDistillation", weight=1.0, kind="frobenius"),
                            SOFT,
                        ]
                    },
                ),  # fmt: skip
            ),
            reference="alone",
            teacher="vit",
        ),
    ]
}


def arm_overrides(study: Study, arm: Arm, smoke: bool) -> dict[str, Any]:
    return {**study.overrides, **arm.overrides, **(SMOKE if smoke else {})}


def train(
    study: Study, seeds: list[int], out: Path, jobs: int, smoke: bool, finished_only: bool = False
) -> dict[str, Any]:
    """Every arm once per seed (``jobs`` runs at a time); returns ``{arm key: SeedRuns}``.

    ``finished_only``: train nothing, collect the finished runs (``FileNotFoundError`` for one
    that is missing or outdated).
    """
    from lightning_metakd.seeds import run_seeds

    def one(arm: Arm, seed_list: list[int]):  # noqa: ANN202 - SeedRuns
        return run_seeds(CONFIGS / arm.config, seed_list, out / study.name / arm.key,
                         arm_overrides(study, arm, smoke), name=arm.label,
                         finished_only=finished_only)  # fmt: skip

    # Seed-major order: the arms of one seed run side by side and share the machine's load.
    work = [(arm, [seed]) for seed in seeds for arm in study.arms]
    if not finished_only:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(lambda job: one(*job), work))
    return {arm.key: one(arm, seeds) for arm in study.arms}  # all finished: collects them


def evaluate(study: Study, runs: dict[str, Any], out: Path, smoke: bool) -> dict[str, Any]:
    """Per test shape and seed, every arm (and, once, the teacher) on the same test episodes."""
    from lightning_metakd.modules import load_learner
    from lightning_metakd.report import compare, report_datamodule
    from lightning_metakd.seeds import mean_sd

    reference = runs[study.reference]
    labels = {arm.key: arm.label for arm in study.arms}
    results: dict[str, Any] = {}
    for ways in study.test_ways:
        data = reference.data_config()
        data.setdefault("init_args", {})["test_ways"] = ways
        datamodule = report_datamodule(data)
        datamodule.prepare_data()
        per_seed: dict[str, dict[str, dict[str, float | None]]] = {}
        teacher_row = None
        for seed in reference.seeds:
            learners = {
                labels[key]: load_learner(
                    next(r for r in runs[key].runs if r.seed == seed).checkpoint
                )
                for key in labels
            }
            if teacher_row is None and not smoke:
                learners["teacher"] = load_learner(TEACHERS[study.teacher])
            where = out / study.name / "report" / f"{ways}-way" / f"seed_{seed}"
            rows = compare(learners, datamodule, where, warmup=0, repeats=1, plot=False,
                           reference=labels[study.reference])  # fmt: skip
            for row in rows:
                if row["name"] == "teacher":
                    teacher_row = row
                    continue
                per_seed.setdefault(row["name"], {})[str(seed)] = {
                    "accuracy": row["accuracy"], "ci95": row["ci95"],
                    "diff": row["diff_vs_reference"], "diff_ci95": row["diff_ci95"],
                    "parameters": row["parameters"],
                }  # fmt: skip
        table = []
        for label, seeds in per_seed.items():
            acc, acc_sd = mean_sd([s["accuracy"] for s in seeds.values()])
            row: dict[str, Any] = {"name": label, "seeds": len(seeds), "accuracy": acc,
                                   "accuracy_sd": acc_sd,
                                   "ci95": mean_sd([s["ci95"] for s in seeds.values()])[0],
                                   "parameters": next(iter(seeds.values()))["parameters"],
                                   "per_seed": seeds}  # fmt: skip
            diffs = [s["diff"] for s in seeds.values() if s["diff"] is not None]
            if diffs:
                row["diff"], row["diff_sd"] = mean_sd(diffs)
                row["diff_ci95"] = mean_sd([s["diff_ci95"] for s in seeds.values()])[0]
            if teacher_row is not None:
                row["share_of_teacher"] = acc / teacher_row["accuracy"]
            table.append(row)
        results[f"{ways}-way"] = {"rows": table, "teacher": teacher_row}
    return results


def gains(rows: list[dict[str, Any]]) -> None:
    """Mark each row whose paired gain exceeds both its sd over seeds and its per-seed CI."""
    for row in rows:
        if "diff" in row:
            spread = max(row.get("diff_sd") or 0.0, row.get("diff_ci95") or 0.0)
            row["counts"] = abs(row["diff"]) > spread


def markdown(study: Study, results: dict[str, Any]) -> str:
    """One table per test shape: accuracy mean ± sd, paired Δ mean ± sd and CI, share of teacher."""
    reference = next(a.label for a in study.arms if a.key == study.reference)
    lines = [f"## {study.title}", ""]
    for shape, result in results.items():
        gains(result["rows"])
        teacher = result["teacher"]
        lines += [
            f"### {shape} 1-shot, within a radical group (paired against {reference})",
            "",
            "| arm | params | accuracy (%), mean ± sd over seeds | per-run 95% CI | "
            "Δ (points, paired), mean ± sd | per-seed Δ 95% CI | of teacher |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        if teacher is not None:
            lines.append(f"| teacher (one run) | {teacher['parameters']:,} | "
                         f"{100 * teacher['accuracy']:.2f} | ± {100 * teacher['ci95']:.2f} | | | |")  # fmt: skip
        for row in result["rows"]:
            sd = f" ± {100 * row['accuracy_sd']:.2f}" if row["accuracy_sd"] is not None else ""
            diff = ci = ""
            if "diff" in row:
                dsd = f" ± {100 * row['diff_sd']:.2f}" if row["diff_sd"] is not None else ""
                mark = " **✓**" if row["counts"] else ""
                diff, ci = f"{100 * row['diff']:+.2f}{dsd}{mark}", f"± {100 * row['diff_ci95']:.2f}"
            share = f"{100 * row['share_of_teacher']:.1f}%" if "share_of_teacher" in row else ""
            name = row["name"].replace("|", "\\|")  # a cell of a Markdown table
            lines.append(f"| {name} | {row['parameters']:,} | {100 * row['accuracy']:.2f}{sd} "
                         f"| ± {100 * row['ci95']:.2f} | {diff} | {ci} | {share} |")  # fmt: skip
        lines.append("")
    lines.append(
        "✓: the paired difference (a gain or a loss) exceeds both its sd over seeds and its per-seed 95% CI.\n"
    )
    return "\n".join(lines)


# -- accuracy against training time ------------------------------------------------------------------
def val_curve(run_dir: Path) -> list[tuple[float, int, float]]:
    """``[(seconds since the run's logger started, step, val/acc)]`` from its TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(run_dir.rglob("events.out.tfevents.*"))
    if not events:
        raise FileNotFoundError(f"no TensorBoard events under {run_dir}")
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    start = accumulator.FirstEventTimestamp()
    return [(e.wall_time - start, e.step, e.value) for e in accumulator.Scalars("val/acc")]


def margins_at(points: list, ref: list) -> list[tuple[float, float]]:
    """``[(budget, margin)]``: at each validation of ``points``, its accuracy minus the best of
    ``ref`` by that budget.

    The reference gets every second the arm was given (its best checkpoint so far is what it would
    ship at that budget); a budget before its first validation counts its first validation.

    Example:
        >>> margins_at([(1, 0, 0.5), (3, 0, 0.75)], [(2, 0, 0.25), (3, 0, 1.0)])
        [(1, 0.25), (3, -0.25)]
    """
    out = []
    for budget, _, acc in points:
        seen = [a for t, _, a in ref if t <= budget] or [ref[0][2]]
        out.append((budget, acc - max(seen)))
    return out


def budget_margins(curves: dict[str, dict[int, list]], arm: str, reference: str) -> dict[str, Any]:
    """Per seed: at each validation of ``arm``, its accuracy minus the best ``reference`` had by
    then (:func:`margins_at`), summarised: the smallest and mean margin, and both runs' ends."""
    out = {}
    for seed, points in curves[arm].items():
        ref = curves[reference][seed]
        margins = [margin for _, margin in margins_at(points, ref)]
        out[str(seed)] = {
            "min_margin": min(margins),
            "mean_margin": sum(margins) / len(margins),
            "above_everywhere": min(margins) > 0,
            "arm_seconds": points[-1][0],
            "reference_seconds": ref[-1][0],
            "reference_best": max(a for _, _, a in ref),
            "arm_best": max(a for _, _, a in points),
        }
    return out


def max_epochs(study: Study, arm: Arm, smoke: bool = False) -> int:
    """The epochs ``arm`` trains: its overrides' ``trainer.max_epochs``, else its config's."""
    epochs = arm_overrides(study, arm, smoke).get("trainer.max_epochs")
    if epochs is None:
        import yaml

        epochs = yaml.safe_load((CONFIGS / arm.config).read_text())["trainer"]["max_epochs"]
    return int(epochs)


def epoch_cost(study: Study, runs: dict[str, Any]) -> dict[str, float]:
    """Per arm, what one of its epochs costs in epochs of the twin (1 for arms of the twin's config).

    The ratio of ``study.cost_pair``'s training seconds per epoch, seed by seed (the two ran side
    by side, under the same load), averaged over seeds, applies to every arm of the distilled
    arm's config.
    """
    if study.cost_pair is None:
        return {key: 1.0 for key in runs}
    distilled, twin = study.cost_pair
    arms = {a.key: a for a in study.arms}
    seconds = {
        key: {r.seed: r.marker.get("seconds") / max_epochs(study, arms[key]) for r in runs[key].runs}
        for key in (runs if study.cost_per_arm else study.cost_pair)
    }  # fmt: skip

    def ratio(key: str) -> float:
        found = [seconds[key][s] / seconds[twin][s] for s in seconds[key]
                 if seconds[twin].get(s)]  # fmt: skip
        return sum(found) / len(found)

    if study.cost_per_arm:
        return {key: 1.0 if key == twin else ratio(key) for key in runs}
    factor = ratio(distilled)
    config = next(a.config for a in study.arms if a.key == distilled)
    return {a.key: factor if a.config == config else 1.0 for a in study.arms}


def plot_curves(study: Study, runs: dict[str, Any], path: Path) -> dict[str, Any]:
    """Validation accuracy against training wall time, and against training cost in twin epochs
    (see :func:`epoch_cost`), every seed of every arm; returns the margins on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    curves = {
        key: {r.seed: val_curve(r.run_dir) for r in seeds.runs} for key, seeds in runs.items()
    }
    cost = epoch_cost(study, runs)
    arms = {a.key: a for a in study.arms}
    costed = {
        key: {seed: spread(points, cost[key] * max_epochs(study, arms[key]))
              for seed, points in per_seed.items()}
        for key, per_seed in curves.items()
    }  # fmt: skip
    figure, (wall, work, gap) = pyplot.subplots(1, 3, figsize=(18, 5.6), dpi=120)
    work.sharey(wall)
    colours = [
        "tab:gray",
        "tab:blue",
        "tab:purple",
        "tab:cyan",
        "tab:orange",
        "tab:green",
        "tab:red",
        "tab:brown",
    ]
    for axis, data, scale in ((wall, curves, 60), (work, costed, 1)):
        for colour, arm in zip(colours, study.arms, strict=False):
            for index, (_seed, points) in enumerate(sorted(data[arm.key].items())):
                axis.plot([t / scale for t, _, _ in points], [100 * a for _, _, a in points], "-o",
                          color=colour, markersize=3, alpha=0.8, linewidth=1.2,
                          label=arm.label if index == 0 else None)  # fmt: skip
        axis.grid(alpha=0.3)
    wall.set_xlabel(wrap("training wall time (min; 1 thread per run; the load of the shared CPU "
                         "varied between runs: the middle panel is the load-free axis)"))  # fmt: skip
    factor = max(cost.values())
    pair = " and ".join(f"{max_epochs(study, a)}-epoch {a.key}" for a in study.arms
                        if study.cost_pair and a.key in study.cost_pair)  # fmt: skip
    if study.cost_per_arm:
        each = ", ".join(f"{key} {value:.2f}" for key, value in cost.items() if value != 1.0)
        what = (f"an epoch of each arm = its per-epoch wall-time ratio to {study.cost_pair[1]}'s: "
                f"{each}")  # fmt: skip
    else:
        what = (f"a distillation epoch = {factor:.2f}, the per-epoch wall-time ratio of the "
                f"{pair or 'arms'}, trained side by side")  # fmt: skip
    work.set_xlabel(wrap(f"training cost in epochs of the twin ({what}; spread over each run as "
                         "its wall time went)"))  # fmt: skip
    wall.set_ylabel("validation accuracy (%), 5-way 1-shot")
    work.legend(loc="lower right", fontsize=8)
    # The margin at every budget: what the curves' top end hides (their gaps are tenths of a point).
    twins = twin_arms(study)
    best_twin = envelope(costed, twins)
    for colour, arm in zip(colours, study.arms, strict=False):
        if arm.key in twins:
            continue
        for index, (seed, points) in enumerate(sorted(costed[arm.key].items())):
            found = margins_at(points, best_twin[seed])
            gap.plot([t for t, _ in found], [100 * m for _, m in found], "-o", color=colour,
                     markersize=3, alpha=0.8, linewidth=1.2,
                     label=arm.label if index == 0 else None)  # fmt: skip
    gap.axhline(0, color="black", linewidth=0.8)
    gap.set_yscale("symlog", linthresh=1.0)  # linear within ±1 point, where the late budgets are
    gap.grid(alpha=0.3)
    gap.set_xlabel(
        wrap("training cost in epochs of the twin (as the middle panel), every seed", 60)
    )
    gap.set_ylabel(wrap("validation accuracy minus the best twin's by the same cost (points; "
                        "linear within ±1, logarithmic beyond)", 50))  # fmt: skip
    gap.legend(loc="best", fontsize=8)
    figure.suptitle(study.title, fontsize=10)
    low = min(100 * a for c in curves.values() for p in c.values() for _, _, a in p)
    wall.set_ylim(max(low - 1, 0), 100)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)
    others = [a.key for a in study.arms if a.key != study.reference]
    budgets: dict[str, Any] = {
        "epoch_cost": cost,
        "wall_time": {key: budget_margins(curves, key, study.reference) for key in others},
        "twin_epochs": {key: budget_margins(costed, key, study.reference) for key in others},
    }
    if study.cost_pair is not None:  # every distilled arm against the best of all twin arms
        for axis, data in (("wall_time", curves), ("twin_epochs", costed)):
            best = {**data, BEST_TWIN: envelope(data, twins)}
            budgets[f"{axis}_vs_best_twin"] = {
                a.key: budget_margins(best, a.key, BEST_TWIN)
                for a in study.arms if a.key not in twins
            }  # fmt: skip
    return budgets


def spread(points: list, total: float) -> list:
    """``points`` (``[(seconds, step, acc)]``) with their seconds rescaled so that the run ends at
    ``total`` (its load-free cost in twin epochs): a run's cost is spread over its validations as
    its own wall time went, so the dearer first epochs of a cold teacher cache count as such.

    Example:
        >>> spread([(10.0, 1, 0.5), (20.0, 2, 0.6), (40.0, 3, 0.7)], 8.0)
        [(2.0, 1, 0.5), (4.0, 2, 0.6), (8.0, 3, 0.7)]
    """
    end = points[-1][0] or 1.0
    return [(total * seconds / end, step, acc) for seconds, step, acc in points]


def wrap(text: str, width: int = 75) -> str:
    """``text`` in lines of at most ``width`` characters (an axis label that fits its panel)."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def twin_arms(study: Study) -> list[str]:
    """The keys of the undistilled arms: those of the cost pair's twin config (else the reference)."""
    if study.cost_pair is None:
        return [study.reference]
    twin_config = next(a.config for a in study.arms if a.key == study.cost_pair[1])
    return [a.key for a in study.arms if a.config == twin_config]


#: The pseudo-arm of :func:`envelope`: at every budget, the best any twin arm of the seed had.
BEST_TWIN = "best twin"


def envelope(curves: dict[str, dict[int, list]], keys: list[str]) -> dict[int, list]:
    """Per seed, the validations of all arms ``keys`` in one time-sorted list (their envelope:
    :func:`budget_margins` takes the best of them seen by each budget)."""
    seeds = set.intersection(*(set(curves[key]) for key in keys))
    return {seed: sorted(p for key in keys for p in curves[key][seed]) for seed in seeds}


def only(study: Study, keys: list[str] | None, keep_reference: bool = True) -> Study:
    """``study`` with the arms in ``keys`` (and its reference arm); all of them for ``None``."""
    if keys is None:
        return study
    unknown = set(keys) - {a.key for s in STUDIES.values() for a in s.arms}
    if unknown:  # --arms applies to every study named, so a key of another study is fine
        raise SystemExit(f"kanji_study: error: no arm {sorted(unknown)} in any study")
    keep = set(keys) | ({study.reference} if keep_reference else set())
    arms = tuple(a for a in study.arms if a.key in keep)
    return replace(study, arms=arms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", choices=list(STUDIES), help="the studies to run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="the runs' folder")
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "results",
                        help="where <study>.json/.md (and the main study's picture) go")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="3 steps per run: do the arms run?")
    parser.add_argument("--arms", nargs="+", default=None, metavar="KEY",
                        help="run only these arms of each study (its reference arm always runs)")  # fmt: skip
    parser.add_argument("--replot", action="store_true",
                        help="redraw the curves and margins of a finished study from its runs and "
                        "<results>/<study>.json (no training, no evaluation)")  # fmt: skip
    parser.add_argument("--train_only", action="store_true",
                        help="train the arms, skip the evaluation (e.g. two processes training "
                        "disjoint --arms; a last call without it evaluates)")  # fmt: skip
    opts = parser.parse_args()
    out = opts.out.resolve()
    if opts.smoke:
        out, opts.results = out / "smoke", out / "smoke" / "results"
    for name in opts.studies:
        study = only(STUDIES[name], opts.arms, keep_reference=not opts.train_only)
        teacher = Path(TEACHERS[study.teacher])
        if not teacher.is_file():
            print(f"kanji_study: error: {name} needs the teacher {teacher}; train it first "
                  "(see the usage at the top of this script).", file=sys.stderr)  # fmt: skip
            return 2
        began = time.perf_counter()
        if opts.replot:  # redraw only: never train (or clear) a missing or outdated run
            saved = opts.results / f"{name}.json"
            try:
                if not saved.is_file():
                    raise FileNotFoundError(f"no {saved}: evaluate the study first")
                runs = train(study, opts.seeds, out, opts.jobs, opts.smoke, finished_only=True)
            except FileNotFoundError as error:
                print(f"kanji_study: error: --replot needs the finished study: {error}",
                      file=sys.stderr)  # fmt: skip
                return 2
            results = json.loads(saved.read_text())
            results["budgets"] = plot_curves(
                study, runs, opts.results / f"{name}_accuracy_vs_time.png"
            )
            saved.write_text(json.dumps(results, indent=2) + "\n")
            print(json.dumps(results["budgets"], indent=2))
            continue
        runs = train(study, opts.seeds, out, opts.jobs, opts.smoke)
        if opts.train_only:
            print(
                f"[study] {name}: trained {', '.join(runs)}; evaluate with a call without --train_only"
            )
            continue
        results: dict[str, Any] = {
            "study": study.title,
            "date": time.strftime("%Y-%m-%d"),
            "seeds": opts.seeds,
            "command": "OMP_NUM_THREADS=1 python scripts/kanji_study.py " + " ".join(sys.argv[1:]),
            "arms": {
                a.key: {
                    "label": a.label,
                    "config": f"configs/kanji/{a.config}",
                    "overrides": arm_overrides(study, a, opts.smoke),
                }
                for a in study.arms
            },  # fmt: skip
            "training_seconds": {
                key: {str(r.seed): r.marker.get("seconds") for r in seeds.runs}
                for key, seeds in runs.items()
            },  # fmt: skip
            "tests": evaluate(study, runs, out, opts.smoke),
        }
        table = markdown(study, results["tests"])
        if study.curves:
            picture = opts.results / f"{name}_accuracy_vs_time.png"
            results["budgets"] = plot_curves(study, runs, picture)
            table += f"\n![validation accuracy against training time]({picture.name})\n"
        opts.results.mkdir(parents=True, exist_ok=True)
        (opts.results / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
        (opts.results / f"{name}.md").write_text(table)
        print(table)
        if "budgets" in results:
            print(json.dumps(results["budgets"], indent=2))
        minutes = (time.perf_counter() - began) / 60
        print(f"[study] {name}: {minutes:.0f} min; written {opts.results / name}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
