"""The pipeline's stages: training through the ``metakd`` LightningCLI, fine-tuning, the report."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lightning_metakd.pipeline.config import (
    REPORT_NAMES,
    PipelineSpec,
    _read_yaml,
    merge_config,
)


# -- stages -----------------------------------------------------------------------------------------
def _test_results(results: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def run_training_stage(
    stage: str, config: dict[str, Any], stage_dir: Path, test: bool = True
) -> dict[str, Any]:
    """Fit then (with ``test``) test one stage through the ``metakd`` LightningCLI; returns its
    marker fields.

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
    results = trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint) if test else []
    score = getattr(callback, "best_model_score", None)
    return {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "normalization": getattr(getattr(model, "learner", None), "normalization", None),
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


#: Where the report's early measurements go (beside the stage folders: the report's own folder
#: is emptied when the report stage begins).
PREFETCH_FILE = "report_prefetch.pt"


def prefetch_report_accuracies(
    data_config: Mapping[str, Any], checkpoints: list[str], out: Path
) -> dict[str, Any]:
    """The test-episode accuracies of ``checkpoints``' learners, measured before the report stage.

    The pipeline runs this in its second process while the distilled student trains: the
    teacher's and the undistilled student's accuracies are then ready when the report begins,
    which measures only what is new (the distilled student) and every learner's size and
    latency. Writes ``{"episodes": digest, "accuracies": {learner digest: [episodes]}}`` to
    ``out`` (``torch.save``); the report uses an entry only where both digests are its own
    (:func:`~lightning_metakd.report.comparison.episodes_digest`, :func:`~lightning_metakd.
    report.comparison.learner_digest`), so a stale or foreign file changes nothing.
    """
    import torch

    from lightning_metakd.atomic import atomic_write
    from lightning_metakd.modules import read_checkpoint
    from lightning_metakd.report import report_datamodule
    from lightning_metakd.report.comparison import (
        episode_accuracies,
        episodes_digest,
        learner_digest,
    )

    datamodule = report_datamodule(data_config)
    datamodule.prepare_data()
    accuracies = {}
    for path in checkpoints:
        learner = read_checkpoint(path).learner()
        accuracies[learner_digest(learner)] = episode_accuracies(learner, datamodule)
    found = {"episodes": episodes_digest(datamodule), "accuracies": accuracies}
    atomic_write(out, lambda handle: torch.save(found, handle))
    return {"learners": len(accuracies)}


def _prefetched(path: Path, datamodule: Any, learners: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: accuracies}`` of ``learners`` that :func:`prefetch_report_accuracies` measured."""
    import torch

    from lightning_metakd.report.comparison import episodes_digest, learner_digest

    if not path.is_file():
        return {}
    found = torch.load(path, weights_only=True)
    if found.get("episodes") != episodes_digest(datamodule):
        return {}
    accuracies = found.get("accuracies", {})
    digests = {name: learner_digest(learner) for name, learner in learners.items()}
    return {name: accuracies[d] for name, d in digests.items() if d in accuracies}


def run_report_stage(spec: PipelineSpec, markers: Mapping[str, Mapping[str, Any]]) -> dict:
    """Compare the three learners on the distill stage's fixed test episodes; returns marker fields.

    Accuracies that :func:`prefetch_report_accuracies` measured on the same episodes for the same
    learners are taken from its file (which is then removed); the rest are measured here.
    """
    from lightning_metakd.modules import read_checkpoint
    from lightning_metakd.report import (
        checkpoint_learners,
        compare,
        markdown_table,
        report_datamodule,
    )
    from lightning_metakd.report.command import episode_progress

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
    prefetch = spec.run_dir / PREFETCH_FILE
    known = _prefetched(prefetch, datamodule, learners)
    prefetch.unlink(missing_ok=True)
    with episode_progress(datamodule, len(learners) - len(known), desc="[pipeline] report"):
        rows = compare(
            learners,
            datamodule,
            spec.run_dir,
            warmup=spec.report.get("warmup", 2),
            repeats=spec.report.get("repeats", 10),
            known_accuracies=known,
        )
    table = markdown_table(rows)
    log_report_to_tensorboard(spec.run_dir / "report", rows, table, spec.run_dir / "report.png")
    return {
        "rows": rows,
        "files": [str(spec.run_dir / f"report.{e}") for e in ("json", "md", "png")],
        "prefetched": [name for name in learners if name in known],
    }
