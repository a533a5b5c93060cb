"""The pipeline YAML: its stages and keys, parsing with clear errors, each stage's LightningCLI config."""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
_TOP_KEYS = (
    "name", "run_dir", "threads", "processes", "stage_tests", "overrides", *STAGES, *OPTIONAL_STAGES
)  # fmt: skip
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
    #: How many stages may run at once: with 2, a stage that needs no other (the baseline
    #: student) trains in a second process beside the teacher and the distilled student.
    processes: int = 1
    #: Test each training stage after its fit; ``False`` leaves testing to the report, which
    #: measures the same learners on the distill stage's test episodes.
    stage_tests: bool = True
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


def _check_keys(
    path: Path,
    section: Mapping[str, Any],
    allowed: Sequence[str],
    where: str,
    owner: str,
    note: str = "",
) -> None:
    """Refuse the keys of ``section`` (``where`` in the config at ``path``) that are not ``allowed``.

    The message lists them and what ``owner`` has: ``"<path>: unknown key(s) ['nme']; a pipeline
    config has [...]"``, ``"<path>: unknown key(s) [...] in 'report'; it has [...]"``.
    """
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise PipelineConfigError(
            f"{path}: unknown key(s) {unknown}{where}; {owner} has {list(allowed)}{note}."
        )


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
    _check_keys(path, data, _TOP_KEYS, "", "a pipeline config")
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
    processes = data.get("processes", 1)
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise PipelineConfigError(
            f"{path}: processes must be a positive integer (how many stages may train at once; "
            f"1 runs them one after another), got {processes!r}."
        )
    stage_tests = data.get("stage_tests", True)
    if not isinstance(stage_tests, bool):
        raise PipelineConfigError(
            f"{path}: stage_tests must be true or false (test each training stage, or leave "
            f"testing to the report), got {stage_tests!r}."
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
        _check_keys(path, entry, _STAGE_KEYS, f" in {stage!r}", "a stage")
        config = (path.parent / str(entry["config"])).resolve()
        if not config.is_file():
            raise PipelineConfigError(
                f"{path}: the {stage!r} stage config {str(config)!r} does not exist."
            )
        stages[stage] = StageSpec(
            config, expand_dotted(entry.get("overrides") or {}, f"{stage}.overrides")
        )
    report = dict(data.get("report") or {})
    _check_keys(path, report, _REPORT_KEYS, " in 'report'", "it")
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
        processes=processes,
        stage_tests=stage_tests,
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
    note = " (the checkpoint is the distill stage's, the output <run>/finetune/)"
    _check_keys(path, section, allowed, " in 'finetune'", "it", note)
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
