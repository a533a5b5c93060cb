"""Running a pipeline: which stages are finished (``done.json`` markers), what to rerun, and the
``metakd pipeline`` command."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_metakd.atomic import atomic_write
from lightning_metakd.command_errors import UsageError, fail
from lightning_metakd.command_line import pipeline_parser
from lightning_metakd.pipeline import stages
from lightning_metakd.pipeline.config import (
    DEPENDS_ON,
    MARKER,
    TRAINING_STAGES,
    PipelineConfigError,
    PipelineSpec,
    _digest,
    _folder_fingerprint,
    load_pipeline_config,
    pipeline_stages,
    stage_config,
)


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


# -- the pipeline -----------------------------------------------------------------------------------
def _rerun_reason(
    stage: str,
    marker: Mapping[str, Any] | None,
    inputs: str,
    rerun: set[str],
    force: bool,
    started: bool = True,
) -> str | None:
    """Why ``stage`` must run, or ``None`` when its finished result can be kept.

    ``started``: the stage's folder exists, so a stage without a marker was interrupted ("not
    finished") rather than never run ("new").
    """
    if force:
        return "--force"
    if marker is None:
        return "not finished" if started else "new"
    if marker.get("inputs") != inputs:
        return "its config changed"
    changed = [dep for dep in DEPENDS_ON[stage] if dep in rerun]
    if changed:
        return f"{' and '.join(changed)} ran again"
    return None


def duration(seconds: float) -> str:
    """``"45 s"``, ``"2 min 05 s"``, ``"1 h 02 min"``.

    Example:
        >>> duration(44.6), duration(125), duration(3720)
        ('45 s', '2 min 05 s', '1 h 02 min')
    """
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def planned_steps(config: Mapping[str, Any]) -> int | None:
    """The optimisation steps a stage config asks for (``max_steps``, or epochs × steps per epoch)."""
    trainer = config.get("trainer") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    max_steps, epochs, per_epoch = (
        trainer.get("max_steps"),
        trainer.get("max_epochs"),
        data.get("steps_per_epoch"),
    )
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    if isinstance(epochs, int) and isinstance(per_epoch, int):
        return epochs * per_epoch
    return None


#: The training stages whose seconds per step estimate a stage's: those of the same network.
SAME_LEARNER: dict[str, tuple[str, ...]] = {
    "teacher": (),
    "student_baseline": ("distill",),
    "distill": ("student_baseline",),
}


def remaining_estimate(
    spec: PipelineSpec,
    todo: list[str],
    markers: Mapping[str, Mapping[str, Any]],
    earlier: Mapping[str, Mapping[str, Any] | None],
) -> str:
    """``"about 2 min 10 s to go (distill ~1 min 30 s, report ~40 s)"`` for the stages ``todo``.

    A stage that ran before (an outdated ``done.json``) is expected to take as long again; a
    training stage that never ran takes its planned steps (:func:`planned_steps`) at the seconds
    per step of a finished stage that trains the same network (the baseline and the distilled
    student: :data:`SAME_LEARNER`; a teacher's steps say little about a student's); else its time
    is unknown (``?``).
    """
    parts, total, unknown = [], 0.0, False
    for stage in todo:
        seconds = (earlier.get(stage) or {}).get("seconds")
        ran = [
            markers[s] for s in SAME_LEARNER.get(stage, ()) if markers.get(s, {}).get("global_step")
        ]
        rate = sum(m["seconds"] for m in ran) / sum(m["global_step"] for m in ran) if ran else None
        if seconds is None and rate is not None and stage in TRAINING_STAGES:
            steps = planned_steps(_read_stage_config(spec, stage))
            seconds = None if steps is None else rate * steps
        if seconds is None:
            unknown = True
            parts.append(f"{stage} ?")
        else:
            total += seconds
            parts.append(f"{stage} ~{duration(seconds)}")
    if unknown and not total:
        return f"still to run: {', '.join(todo)} (no estimate yet)"
    lead = f"about {duration(total)}{' + ?' if unknown else ''} to go"
    return f"{lead} ({', '.join(parts)})"


def _read_stage_config(spec: PipelineSpec, stage: str) -> dict[str, Any]:
    try:
        return stage_config(spec, stage, teacher_checkpoint="(the teacher stage's)")
    except (OSError, ValueError):
        return {}


def _will_run(
    stage: str, earlier: Mapping[str, Any], ran: set[str], force: bool, order: tuple[str, ...]
) -> bool:
    """Whether ``stage`` is expected to run: forced, never finished, or an input stage runs."""
    if force or earlier.get(stage) is None:
        return True
    return any(
        dep in ran or (dep in order and _will_run(dep, earlier, ran, force, order))
        for dep in DEPENDS_ON[stage]
    )


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
    order = pipeline_stages(spec)
    earlier = {stage: read_marker(spec.run_dir, stage) for stage in order}
    for index, stage in enumerate(order, start=1):
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
        reason = _rerun_reason(stage, marker, inputs, rerun, force, stage_dir.is_dir())
        if reason is None:
            say(f"[pipeline] stage {index}/{len(order)}: {stage} skipped (finished; {MARKER})")
            markers[stage] = marker  # type: ignore[assignment]
            continue
        say(f"[pipeline] stage {index}/{len(order)}: {stage} ({reason})")
        if stage_dir.exists():
            shutil.rmtree(stage_dir)  # a half-written or outdated stage starts clean
        stage_dir.mkdir(parents=True)  # from now on a missing done.json means "not finished"
        began = time.perf_counter()
        if stage == "report":
            result = stages.run_report_stage(spec, markers)
        elif stage == "finetune":
            result = stages.run_finetune_stage(config, stage_dir, say)
        else:
            result = stages.run_training_stage(stage, config, stage_dir, spec.stage_tests)
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
            else f": best val/acc {100 * marker['best_val_acc']:.2f}% (the report tests it)"
            if marker.get("best_val_acc") is not None
            else ""
        )
        if marker.get("holdout_accuracy") is not None:
            summary = (
                f": held-out accuracy {100 * marker['holdout_accuracy']:.2f}% "
                f"({marker['holdout_images']} images)"
            )
        say(
            f"[pipeline] stage {index}/{len(order)}: {stage} done in {marker['seconds']:.0f} s{summary}"
        )
        todo = [s for s in order[index:] if _will_run(s, earlier, rerun, force, order)]
        if todo:
            say(
                f"[pipeline] {duration(time.perf_counter() - start)} elapsed; "
                f"{remaining_estimate(spec, todo, markers, earlier)}"
            )
    report = spec.run_dir / "report.md"
    say(f"[pipeline] report: {report}")
    say(report.read_text() if report.is_file() else "(report.md is missing)")
    say(
        f"[pipeline] finished in {duration(time.perf_counter() - start)}; "
        f"TensorBoard: tensorboard --logdir {spec.run_dir}"
    )
    return markers


def pipeline_main(argv: list[str]) -> int:
    """``metakd pipeline``: parse the flags (:func:`~lightning_metakd.command_line.pipeline_parser`)
    and run :func:`run_pipeline`; a config mistake or a library error is one line, exit status 2."""
    opts = pipeline_parser().parse_args(argv)
    try:
        spec = load_pipeline_config(opts.config, opts.run_dir)
    except PipelineConfigError as err:
        return fail("metakd pipeline", err)
    try:
        run_pipeline(spec, force=opts.force)
    except UsageError as err:  # a stage config the LightningCLI cannot parse
        return fail("metakd pipeline", err)
    except Exception as err:  # noqa: BLE001 - fail() re-raises everything but expected mistakes
        return fail("metakd pipeline", err, catch_all=True)
    return 0
