"""Running a pipeline: which stages are finished (``done.json`` markers), what to rerun, and the
``metakd pipeline`` command."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_metakd.atomic import atomic_write
from lightning_metakd.pipeline import stages
from lightning_metakd.pipeline.config import (
    DEPENDS_ON,
    MARKER,
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
    order = pipeline_stages(spec)
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
        reason = _rerun_reason(stage, marker, inputs, rerun, force)
        if reason is None:
            say(f"[pipeline] stage {index}/{len(order)}: {stage} skipped (finished; {MARKER})")
            markers[stage] = marker  # type: ignore[assignment]
            continue
        say(f"[pipeline] stage {index}/{len(order)}: {stage} ({reason})")
        if stage_dir.exists():
            shutil.rmtree(stage_dir)  # a half-written or outdated stage starts clean
        began = time.perf_counter()
        if stage == "report":
            result = stages.run_report_stage(spec, markers)
        elif stage == "finetune":
            result = stages.run_finetune_stage(config, stage_dir, say)
        else:
            result = stages.run_training_stage(stage, config, stage_dir)
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
            f"[pipeline] stage {index}/{len(order)}: {stage} done in {marker['seconds']:.0f} s{summary}"
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
