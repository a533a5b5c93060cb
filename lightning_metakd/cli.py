"""The ``metakd`` command: LightningCLI stages for every module and data source.

``metakd fit|validate|test --config configs/kanji/protonet.yaml`` runs a stage from YAML; the model
(any ``LightningModule``, users' subclasses included) and the data (any
:class:`~lightning_metakd.data.EpisodicDataModule`) are named with ``class_path``/``init_args``.
``metakd episodes`` draws episodes from the embedded KanjiVG data and prints their shapes and speed.
``metakd pipeline --config configs/kanji/pipeline.yaml`` chains teacher, baseline student,
distillation and the comparison report (:mod:`lightning_metakd.pipeline`).
``metakd report --config <cfg> --checkpoint [NAME=]<ckpt> ...`` compares trained learners on the
same fixed test episodes (:mod:`lightning_metakd.report`).
``metakd finetune --config configs/kanji/finetune.yaml`` adapts a learner (or distilled student) to
the classes of a folder and writes a fixed classifier (:mod:`lightning_metakd.deploy.finetune`).
``metakd export --classifier <classifier.pt>`` writes it as ``model.pt2`` and ``model.onnx``;
``metakd classify --model DIR IMAGE ...`` labels image files with an exported classifier
(:mod:`lightning_metakd.deploy.predict`).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning_metakd.callbacks import BestAndLastCheckpoint
from lightning_metakd.data import EpisodicDataModule

#: Trainer defaults that suit meta-learning; every one can be overridden in a config or flag.
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "metakd", "default_hp_metric": False},
    },
    # The inner loop needs gradients in validation and test; the modules also guard this themselves.
    "inference_mode": False,
    "log_every_n_steps": 10,
}

#: The default ``trainer.callbacks``: the TensorBoard extras of :mod:`lightning_metakd.callbacks`.
#: A config's ``trainer.callbacks`` replaces the list; ``trainer.callbacks+:`` appends to it.
DEFAULT_CALLBACKS: list[dict[str, Any]] = [
    {"class_path": "lightning_metakd.callbacks.EpisodeImages"},
    {"class_path": "lightning_metakd.callbacks.AttentionMaps"},
    {"class_path": "lightning_metakd.callbacks.HyperparameterMetrics"},
]


class MetaKDCLI(LightningCLI):
    """LightningCLI with a checkpoint on the best ``val/acc`` and the last step, always on."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - jsonargparse parser
        parser.add_lightning_class_args(BestAndLastCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best",
                "trainer.callbacks": DEFAULT_CALLBACKS,
            }
        )


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> MetaKDCLI:
    """Run (or, with ``run=False``, only build) the LightningCLI on ``args``."""
    return MetaKDCLI(
        L.LightningModule,
        EpisodicDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def episodes_main(argv: list[str]) -> int:
    """``metakd episodes``: draw KanjiVG episodes and print their shapes and throughput."""
    from lightning_metakd.data import KanjiDataModule

    parser = argparse.ArgumentParser(
        prog="metakd episodes", description="Draw episodes from the embedded KanjiVG data set."
    )
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--meta-batch-size", type=int, default=32)
    parser.add_argument("--grouping", default="none", choices=["none", "radical"])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    opts = parser.parse_args(argv)
    dm = KanjiDataModule(
        ways=opts.ways,
        shots=opts.shots,
        queries=opts.queries,
        meta_batch_size=opts.meta_batch_size,
        grouping=opts.grouping,
        steps_per_epoch=opts.batches,
        num_workers=opts.num_workers,
        cache_dir=opts.cache_dir,
    )
    t0 = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    print(f"data ready in {time.perf_counter() - t0:.1f} s")
    for split, ds in dm.splits.items():
        print(
            f"  {split:5s}: {ds.num_classes:5d} classes, {len(ds):7d} images, {len(ds.groups)} groups"
        )
    t0 = time.perf_counter()
    episode = None
    for batch in dm.train_dataloader():
        episode = batch
    elapsed = time.perf_counter() - t0
    assert episode is not None
    print(
        f"episode: support_x {tuple(episode.support_x.shape)}, support_y "
        f"{tuple(episode.support_y.shape)}, query_x {tuple(episode.query_x.shape)}, "
        f"query_y {tuple(episode.query_y.shape)}"
    )
    tasks = opts.batches * opts.meta_batch_size
    print(
        f"{opts.batches} meta-batches ({tasks} tasks) in {elapsed:.2f} s: {tasks / elapsed:.0f} tasks/s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``metakd`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "episodes":
        return episodes_main(args[1:])
    if args and args[0] == "pipeline":
        from lightning_metakd.pipeline import pipeline_main

        return pipeline_main(args[1:])
    if args and args[0] == "finetune":
        from lightning_metakd.deploy.finetune import finetune_main

        return finetune_main(args[1:])
    if args and args[0] == "report":
        from lightning_metakd.report import report_main

        return report_main(args[1:])
    if args and args[0] == "export":
        from lightning_metakd.deploy.export import export_main

        return export_main(args[1:])
    if args and args[0] == "classify":
        from lightning_metakd.deploy.predict import classify_main

        return classify_main(args[1:])
    # From the console, LightningCLI reads sys.argv itself (passing it too only earns a warning).
    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
