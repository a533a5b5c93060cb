"""``metakd pipeline``: teacher → baseline student → distilled student → report, resumable.

A pipeline YAML names three LightningCLI stage configs and the overrides to apply to them::

    name: kanji-quickstart                  # run folder: runs/pipeline/<name> (or run_dir: ...)
    threads: 1                              # torch.set_num_threads for every stage (optional)
    overrides:                              # applied to every training stage (dotted or nested)
      data.init_args.num_workers: 0
    teacher:          {config: quickstart/teacher.yaml}           # a MetaLearnerModule config
    student_baseline: {config: quickstart/student_baseline.yaml}  # the student, no teacher
    distill:          {config: quickstart/distill.yaml,           # a DistillationModule config
                       overrides: {trainer.max_epochs: 3}}
    report: {warmup: 2, repeats: 10}        # data: {...} overrides the report's test episodes

Stage config paths are relative to the pipeline YAML. The stages run in this order:

1. ``teacher``: fit, then test the best checkpoint.
2. ``student_baseline``: the student's backbone and algorithm meta-trained without distillation.
3. ``distill``: a :class:`~lightning_metakd.modules.DistillationModule` whose ``teacher`` is set to
   the teacher stage's best checkpoint; fit, then test. Several teachers: when the distill config's
   ``teacher`` is a list of checkpoints, the teacher stage's checkpoint is put first and the
   listed ones follow it (``teacher_weights``, if given, then has one weight per teacher).
4. ``report``: :func:`lightning_metakd.report.compare` of the teacher(s) — with several, each one
   and their ensemble (:func:`lightning_metakd.report.distillation_learners`) — the distilled
   student (``student_learner()``) and the baseline student on the same fixed test episodes (the
   distill stage's data), written to ``<run>/report.{json,md,png}`` and printed as a Markdown
   table.

Optional, only when the pipeline YAML has a ``finetune:`` section (then it runs after
``distill``): ``finetune`` adapts the distilled student to the classes of a folder of class
folders and writes ``<run>/finetune/{classifier.pt,finetune.json}``
(:func:`lightning_metakd.deploy.run_finetune`; the section holds its arguments, ``data_root``
required, e.g. ``finetune: {data_root: runs/my_kanji, holdout: 2, epochs: 20}``). It depends on
``distill`` and reruns when the section or the files under ``data_root`` change.

Each training stage goes through the ``metakd`` LightningCLI (:func:`~lightning_metakd.lightning_cli.
run_lightning_cli` with ``run=False``, then ``trainer.fit`` and ``trainer.test`` on the same
Trainer), so ``class_path`` names any module or data module, users' subclasses included. Its
folder ``<run>/<stage>/`` holds ``stage_config.yaml`` (what was passed to the CLI),
``config.yaml`` (the full resolved config, loadable with ``metakd fit --config``), the TensorBoard
events, ``checkpoints/{best,last}.ckpt`` and, once the stage has finished, ``done.json`` (its
results, written atomically). A stage with a ``done.json`` is skipped when the pipeline runs
again, unless ``--force`` is given, its input config changed, or a stage it depends on ran again
(``distill`` depends on ``teacher``; ``report`` on all three). A stage killed half-way has no
``done.json``; its folder is cleared and it runs again. Delete ``<run>/<stage>/done.json`` to rerun
a stage and the stages that depend on it.

Example::

    metakd pipeline --config configs/kanji/pipeline.yaml            # ~2-3 min on a 2-core CPU
    metakd pipeline --config configs/kanji/pipeline.yaml --force    # rerun every stage
    tensorboard --logdir runs/pipeline
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from lightning_metakd.atomic import atomic_write

#: The stages every pipeline runs, in order (configured :data:`OPTIONAL_STAGES` join them).
STAGES: tuple[str, ...] = ("teacher", "student_baseline", "distill", "report")
#: The stages whose results each stage uses: a stage reruns when one of these ran again.
DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "teacher": (),
    "student_baseline": (),
    "distill": ("teacher",),
    "report": ("teacher", "student_baseline", "distill"),
    "finetune": ("distill",),
}
TRAINING_STAGES: tuple[str, ...] = ("teacher", "student_baseline", "distill")
#: Stages that run only when the pipeline YAML has their section: ``{stage: the stage it follows}``.
OPTIONAL_STAGES: dict[str, str] = {"finetune": "distill"}
#: Row names of the report, in its order.
REPORT_NAMES: dict[str, str] = {
    "teacher": "teacher",
    "distill": "distilled student",
    "student_baseline": "baseline student",
}
MARKER = "done.json"
_TOP_KEYS = ("name", "run_dir", "threads", "overrides", *STAGES, *OPTIONAL_STAGES)
_STAGE_KEYS = ("config", "overrides")
_REPORT_KEYS = ("warmup", "repeats", "data")


class PipelineConfigError(ValueError):
    """A pipeline YAML that cannot be run; the message names the key and the fix."""


@dataclass
class StageSpec:
    """One training stage of a pipeline: its LightningCLI config file and overrides."""

    config: Path
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineSpec:
    """A parsed pipeline YAML (see :func:`load_pipeline_config`)."""

    name: str
    run_dir: Path
    stages: dict[str, StageSpec]
    overrides: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    threads: int | None = None
    source: Path | None = None
    finetune: dict[str, Any] | None = None  #: the optional finetune stage's arguments


# -- config -----------------------------------------------------------------------------------------
def expand_dotted(overrides: Mapping[str, Any], where: str = "overrides") -> dict[str, Any]:
    """Nested dicts from dotted keys: ``{"data.init_args.ways": 5}`` → ``{"data": {...}}``.

    Nested mappings are expanded too, so both spellings can be mixed.

    Example:
        >>> expand_dotted({"trainer.max_epochs": 2, "data": {"init_args.ways": 5}})
        {'trainer': {'max_epochs': 2}, 'data': {'init_args': {'ways': 5}}}
    """
    if not isinstance(overrides, Mapping):
        raise PipelineConfigError(
            f"{where} must be a mapping of config keys to values (e.g. "
            f"`trainer.max_epochs: 2`), got {type(overrides).__name__}."
        )
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = str(key).split(".")
        if not all(parts):
            raise PipelineConfigError(f"{where}: {key!r} is not a valid dotted key.")
        if isinstance(value, Mapping):
            value = expand_dotted(value, f"{where}.{key}")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        leaf = parts[-1]
        if isinstance(node.get(leaf), dict) and isinstance(value, dict):
            node[leaf] = merge_config(node[leaf], value)
        else:
            node[leaf] = value
    return out


def merge_config(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, recursively; lists and scalars are replaced.

    A mapping whose ``class_path`` differs from the base's replaces the base mapping whole (the old
    ``init_args`` belong to another class).

    Example:
        >>> merge_config({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}})
        {'a': {'b': 1, 'c': 3}}
    """
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, Mapping):
            new_class = value.get("class_path")
            if new_class is not None and new_class != old.get("class_path"):
                out[key] = copy.deepcopy(dict(value))
            else:
                out[key] = merge_config(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise PipelineConfigError(f"{what} {str(path)!r} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PipelineConfigError(f"{what} {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise PipelineConfigError(f"{what} {str(path)!r} must hold a mapping of keys to values.")
    return data


def load_pipeline_config(path: str | Path, run_dir: str | Path | None = None) -> PipelineSpec:
    """Read and check a pipeline YAML (format in this module's docstring).

    Args:
        path: the pipeline YAML.
        run_dir: the run folder; overrides the YAML's ``run_dir`` (default
            ``runs/pipeline/<name>``, relative to the working directory).

    Raises:
        PipelineConfigError: unknown keys, a missing stage or stage config file, bad overrides.
    """
    path = Path(path)
    data = _read_yaml(path, "The pipeline config")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise PipelineConfigError(
            f"{path}: unknown key(s) {unknown}; a pipeline config has {list(_TOP_KEYS)}."
        )
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\"):
        raise PipelineConfigError(f"{path}: name must be a non-empty folder name, got {name!r}.")
    overrides = expand_dotted(data.get("overrides") or {}, "overrides")
    threads = data.get("threads")
    if threads is not None and (
        not isinstance(threads, int) or isinstance(threads, bool) or threads < 1
    ):
        raise PipelineConfigError(
            f"{path}: threads must be a positive integer (torch.set_num_threads), got {threads!r}; "
            "leave it out for torch's default."
        )
    stages = {}
    for stage in TRAINING_STAGES:
        entry = data.get(stage)
        if isinstance(entry, str):
            entry = {"config": entry}
        if not isinstance(entry, Mapping) or "config" not in entry:
            raise PipelineConfigError(
                f"{path}: the {stage!r} stage needs a config file: `{stage}: {{config: "
                f"<stage>.yaml}}` (relative to the pipeline config)."
            )
        extra = sorted(set(entry) - set(_STAGE_KEYS))
        if extra:
            raise PipelineConfigError(
                f"{path}: unknown key(s) {extra} in {stage!r}; a stage has {list(_STAGE_KEYS)}."
            )
        config = (path.parent / str(entry["config"])).resolve()
        if not config.is_file():
            raise PipelineConfigError(
                f"{path}: the {stage!r} stage config {str(config)!r} does not exist."
            )
        stages[stage] = StageSpec(
            config, expand_dotted(entry.get("overrides") or {}, f"{stage}.overrides")
        )
    report = dict(data.get("report") or {})
    extra = sorted(set(report) - set(_REPORT_KEYS))
    if extra:
        raise PipelineConfigError(
            f"{path}: unknown key(s) {extra} in 'report'; it has {list(_REPORT_KEYS)}."
        )
    for key, least in (("warmup", 0), ("repeats", 1)):
        value = report.get(key, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise PipelineConfigError(f"{path}: report.{key} must be an integer >= {least}.")
    report["data"] = expand_dotted(report.get("data") or {}, "report.data")
    finetune = _finetune_section(path, data["finetune"]) if "finetune" in data else None
    folder = run_dir if run_dir is not None else data.get("run_dir")
    folder = Path(folder) if folder is not None else Path("runs") / "pipeline" / name
    return PipelineSpec(
        name=name,
        run_dir=folder.expanduser().resolve(),
        stages=stages,
        overrides=overrides,
        report=report,
        threads=threads,
        source=path.resolve(),
        finetune=finetune,
    )


def _finetune_section(path: Path, section: Any) -> dict[str, Any]:
    """The checked ``finetune:`` section: :func:`~lightning_metakd.deploy.run_finetune` arguments."""
    from jsonargparse import ArgumentError

    from lightning_metakd.deploy.finetune import finetune_parser, run_finetune

    given_by_pipeline = ("checkpoint", "output", "echo")
    allowed = [p for p in inspect.signature(run_finetune).parameters if p not in given_by_pipeline]
    if not isinstance(section, Mapping):
        raise PipelineConfigError(
            f"{path}: finetune must be a mapping of arguments, e.g. `finetune: {{data_root: "
            f"<folder of class folders>, holdout: 0.25}}`; got {section!r}."
        )
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise PipelineConfigError(
            f"{path}: unknown key(s) {unknown} in 'finetune'; it has {allowed} (the checkpoint is "
            "the distill stage's, the output <run>/finetune/)."
        )
    if "data_root" not in section:
        raise PipelineConfigError(
            f"{path}: the finetune stage needs a data_root: the folder of class folders to adapt to."
        )
    root = Path(str(section["data_root"])).expanduser().resolve()
    if not root.is_dir():
        raise PipelineConfigError(
            f"{path}: finetune.data_root {str(root)!r} does not exist or is not a folder "
            "(relative paths are relative to the working directory)."
        )
    checked = {**section, "data_root": str(root)}
    try:
        finetune_parser().parse_object({**checked, "checkpoint": "distill"})
    except ArgumentError as err:
        raise PipelineConfigError(f"{path}: finetune: {err}") from None
    return checked


def pipeline_stages(spec: PipelineSpec) -> tuple[str, ...]:
    """The stages ``spec`` runs, in order: :data:`STAGES` plus the optional ones it configures."""
    stages = list(STAGES)
    for stage, after in OPTIONAL_STAGES.items():
        if getattr(spec, stage) is not None:
            stages.insert(stages.index(after) + 1, stage)
    return tuple(stages)


def _folder_fingerprint(root: str | Path) -> str:
    """A digest of the files under ``root`` (names, sizes, modification times)."""
    entries = []
    for folder, _, files in os.walk(root):
        for name in files:
            file = os.path.join(folder, name)
            stat = os.stat(file)
            entries.append((os.path.relpath(file, root), stat.st_size, stat.st_mtime_ns))
    return _digest(sorted(entries))


def stage_config(spec: PipelineSpec, stage: str, teacher_checkpoint: str | None = None) -> dict:
    """The LightningCLI config that ``stage`` runs: its YAML, the overrides, the run folder.

    The pipeline's own settings come last: a TensorBoard logger (always; its other ``init_args`` are
    kept when the stage config names one too) writes to ``<run>/<stage>/``,
    checkpoints to ``<run>/<stage>/checkpoints/``, and the ``distill`` stage's
    ``model.init_args.teacher`` is ``teacher_checkpoint``.
    """
    stage_dir = spec.run_dir / stage
    config = _read_yaml(spec.stages[stage].config, f"The {stage} stage config")
    config = merge_config(config, spec.overrides)
    config = merge_config(config, spec.stages[stage].overrides)
    logger = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(spec.run_dir), "name": stage, "version": ""},
    }
    forced = {
        "trainer": {"default_root_dir": str(stage_dir), "logger": logger},
        "checkpoint": {"dirpath": str(stage_dir / "checkpoints")},
    }
    config = merge_config(config, forced)
    logger_args = config["trainer"]["logger"].setdefault("init_args", {})
    logger_args.setdefault("default_hp_metric", False)
    if stage == "distill":
        if teacher_checkpoint is None:
            raise ValueError("the distill stage needs the teacher stage's checkpoint.")
        init_args = config.setdefault("model", {}).setdefault("init_args", {})
        others = init_args.get("teacher")
        init_args["teacher"] = (
            [teacher_checkpoint, *others] if isinstance(others, list) else teacher_checkpoint
        )
    return config


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- markers ----------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` atomically (see :func:`lightning_metakd.atomic.atomic_write`)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def read_marker(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The ``done.json`` of ``stage`` in ``run_dir``, or ``None`` if it is missing or unreadable."""
    path = run_dir / stage / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("stage") == stage else None


# -- stages -----------------------------------------------------------------------------------------
def _test_results(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def run_training_stage(stage: str, config: dict[str, Any], stage_dir: Path) -> dict[str, Any]:
    """Fit then test one stage through the ``metakd`` LightningCLI; returns its marker fields.

    Writes ``stage_config.yaml`` (the CLI's input) into ``stage_dir``; the CLI itself writes the
    resolved ``config.yaml`` there. The test uses the best checkpoint (``val/acc``), or the last one
    when no validation ran.
    """
    from lightning_metakd.lightning_cli import run_lightning_cli

    stage_dir.mkdir(parents=True, exist_ok=True)
    config_path = stage_dir / "stage_config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = run_lightning_cli(["--config", str(config_path)], run=False)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=datamodule)
    if trainer.interrupted:
        raise RuntimeError(f"the {stage} stage was interrupted; run the pipeline again to redo it.")
    callback = trainer.checkpoint_callback
    best = getattr(callback, "best_model_path", "") or ""
    last = getattr(callback, "last_model_path", "") or ""
    checkpoint = best or last
    if not checkpoint:
        raise RuntimeError(
            f"the {stage} stage wrote no checkpoint; keep the `checkpoint` callback on (it is by "
            "default) so that later stages can load this one."
        )
    results = trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint)
    score = getattr(callback, "best_model_score", None)
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "checkpoint": checkpoint,
        "best_checkpoint": best,
        "last_checkpoint": last,
        "best_val_acc": None if score is None else float(score),
        "global_step": trainer.global_step,
        "test": _test_results(results),
    }


def run_finetune_stage(
    config: Mapping[str, Any], stage_dir: Path, echo: Callable[[str], None]
) -> dict[str, Any]:
    """Adapt the distilled student to the user's classes; returns the finetune marker fields."""
    from lightning_metakd.deploy.finetune import run_finetune

    report = run_finetune(**config["finetune"], output=str(stage_dir), echo=echo)
    keys = ("classifier", "report", "holdout_accuracy", "holdout_images", "train_images")
    return {"classes": len(report["classes"]), **{k: report[k] for k in keys}}


def log_report_to_tensorboard(log_dir: Path, rows: list[dict[str, Any]], table: str, png: Path):
    """The report's plot (``report/accuracy_vs_parameters``), table and accuracies in TensorBoard."""
    import numpy as np
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        if png.is_file():
            with Image.open(png) as image:
                pixels = np.asarray(image.convert("RGB"))
            writer.add_image("report/accuracy_vs_parameters", pixels, 0, dataformats="HWC")
        writer.add_text("report/table", table, 0)
        for row in rows:
            tag = row["name"].replace(" ", "_")
            writer.add_scalar(f"report/accuracy/{tag}", row["accuracy"], 0)
            writer.add_scalar(f"report/parameters/{tag}", row["parameters"], 0)
    finally:
        writer.close()


def run_report_stage(spec: PipelineSpec, markers: Mapping[str, Mapping[str, Any]]) -> dict:
    """Compare the three learners on the distill stage's fixed test episodes; returns marker fields."""
    from lightning_metakd.modules import read_checkpoint
    from lightning_metakd.report import (
        checkpoint_learners,
        compare,
        markdown_table,
        report_datamodule,
    )

    resolved = _read_yaml(spec.run_dir / "distill" / "config.yaml", "The distill stage's config")
    data_config = merge_config(resolved.get("data") or {}, spec.report.get("data") or {})
    datamodule = report_datamodule(data_config)
    datamodule.prepare_data()
    distilled = read_checkpoint(markers["distill"]["checkpoint"])
    baseline = read_checkpoint(markers["student_baseline"]["checkpoint"]).learner()
    if distilled.kind == "distillation":
        learners = checkpoint_learners(distilled, baseline)
    else:  # a distill stage without a teacher inside: the teacher stage gives that row
        learners = {
            REPORT_NAMES["teacher"]: read_checkpoint(markers["teacher"]["checkpoint"]).learner(),
            REPORT_NAMES["distill"]: distilled.learner(),
            REPORT_NAMES["student_baseline"]: baseline,
        }
    rows = compare(
        learners,
        datamodule,
        spec.run_dir,
        warmup=spec.report.get("warmup", 2),
        repeats=spec.report.get("repeats", 10),
    )
    table = markdown_table(rows)
    log_report_to_tensorboard(spec.run_dir / "report", rows, table, spec.run_dir / "report.png")
    return {
        "rows": rows,
        "files": [str(spec.run_dir / f"report.{e}") for e in ("json", "md", "png")],
    }


# -- the pipeline -----------------------------------------------------------------------------------
def _rerun_reason(
    stage: str, marker: Mapping[str, Any] | None, inputs: str, rerun: set[str], force: bool
) -> str | None:
    """Why ``stage`` must run, or ``None`` when its finished result can be kept."""
    if force:
        return "--force"
    if marker is None:
        return "not finished"
    if marker.get("inputs") != inputs:
        return "its config changed"
    changed = [dep for dep in DEPENDS_ON[stage] if dep in rerun]
    if changed:
        return f"{' and '.join(changed)} ran again"
    return None


def run_pipeline(
    spec: PipelineSpec, force: bool = False, echo: Callable[[str], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Run the stages of ``spec`` that are not finished; returns every stage's marker.

    Args:
        spec: from :func:`load_pipeline_config`.
        force: rerun every stage.
        echo: where progress lines go (default: print to stdout, flushed).
    """
    say = echo or (lambda line: print(line, flush=True))
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    say(f"[pipeline] {spec.name}: run folder {spec.run_dir}")
    start = time.perf_counter()
    markers: dict[str, dict[str, Any]] = {}
    rerun: set[str] = set()
    stages = pipeline_stages(spec)
    for index, stage in enumerate(stages, start=1):
        stage_dir = spec.run_dir / stage
        if stage == "report":
            config: dict[str, Any] = {"report": spec.report}
        elif stage == "finetune":
            finetune = {**(spec.finetune or {}), "checkpoint": markers["distill"]["checkpoint"]}
            config = {"finetune": finetune, "files": _folder_fingerprint(finetune["data_root"])}
        else:
            teacher = markers["teacher"]["checkpoint"] if stage == "distill" else None
            config = stage_config(spec, stage, teacher)
        inputs = _digest(config)
        marker = read_marker(spec.run_dir, stage)
        reason = _rerun_reason(stage, marker, inputs, rerun, force)
        if reason is None:
            say(f"[pipeline] stage {index}/{len(stages)}: {stage} skipped (finished; {MARKER})")
            markers[stage] = marker  # type: ignore[assignment]
            continue
        say(f"[pipeline] stage {index}/{len(stages)}: {stage} ({reason})")
        if stage_dir.exists():
            shutil.rmtree(stage_dir)  # a half-written or outdated stage starts clean
        began = time.perf_counter()
        if stage == "report":
            result = run_report_stage(spec, markers)
        elif stage == "finetune":
            result = run_finetune_stage(config, stage_dir, say)
        else:
            result = run_training_stage(stage, config, stage_dir)
        marker = {
            "stage": stage,
            "run_id": uuid.uuid4().hex,
            "inputs": inputs,
            "depends_on": {dep: markers[dep]["run_id"] for dep in DEPENDS_ON[stage]},
            "seconds": round(time.perf_counter() - began, 1),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **result,
        }
        write_json_atomic(stage_dir / MARKER, marker)
        markers[stage] = marker
        rerun.add(stage)
        test = marker.get("test", {})
        summary = (
            f": test/acc {100 * test['test/acc']:.2f} ± {100 * test.get('test/acc_ci95', 0):.2f}%"
            if "test/acc" in test
            else ""
        )
        if marker.get("holdout_accuracy") is not None:
            summary = (
                f": held-out accuracy {100 * marker['holdout_accuracy']:.2f}% "
                f"({marker['holdout_images']} images)"
            )
        say(
            f"[pipeline] stage {index}/{len(stages)}: {stage} done in {marker['seconds']:.0f} s{summary}"
        )
    report = spec.run_dir / "report.md"
    say(f"[pipeline] report: {report}")
    say(report.read_text() if report.is_file() else "(report.md is missing)")
    say(
        f"[pipeline] finished in {time.perf_counter() - start:.0f} s; "
        f"TensorBoard: tensorboard --logdir {spec.run_dir}"
    )
    return markers


def pipeline_main(argv: list[str]) -> int:
    """``metakd pipeline``: parse the flags and run :func:`run_pipeline`."""
    parser = argparse.ArgumentParser(
        prog="metakd pipeline",
        description=(
            "Train a teacher, a baseline student and a distilled student, then compare them on "
            "the same test episodes. Finished stages are skipped when run again."
        ),
    )
    parser.add_argument("--config", required=True, help="the pipeline YAML")
    parser.add_argument("--force", action="store_true", help="rerun every stage")
    parser.add_argument("--run-dir", default=None, help="run folder (default runs/pipeline/<name>)")
    opts = parser.parse_args(argv)
    try:
        spec = load_pipeline_config(opts.config, opts.run_dir)
    except PipelineConfigError as err:
        print(f"metakd pipeline: error: {err}", file=sys.stderr)
        return 2
    run_pipeline(spec, force=opts.force)
    return 0


__all__ = [
    "DEPENDS_ON",
    "OPTIONAL_STAGES",
    "STAGES",
    "PipelineConfigError",
    "PipelineSpec",
    "StageSpec",
    "expand_dotted",
    "load_pipeline_config",
    "merge_config",
    "pipeline_main",
    "pipeline_stages",
    "read_marker",
    "run_pipeline",
    "stage_config",
    "write_json_atomic",
]
