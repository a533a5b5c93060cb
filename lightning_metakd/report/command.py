"""``metakd report``: compare checkpoints on the same fixed test episodes."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning_metakd.config_checks import data_fixes, data_section, describe_mismatch
from lightning_metakd.data import EpisodicDataModule
from lightning_metakd.distill import TeacherEnsemble
from lightning_metakd.modules import read_checkpoint
from lightning_metakd.report.comparison import Measured, checkpoint_learners, compare
from lightning_metakd.report.tables import markdown_table


def report_datamodule(data_config: Mapping[str, Any]) -> EpisodicDataModule:
    """Instantiate an :class:`~lightning_metakd.data.EpisodicDataModule` from its ``class_path`` config.

    The ``data:`` section of a LightningCLI config (``{"class_path": ..., "init_args": {...}}``):
    how ``metakd report`` and the pipeline's report stage build their test episodes.
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(EpisodicDataModule, "data")
    parsed = parser.parse_object({"data": dict(data_config)})
    return parser.instantiate_classes(parsed)["data"]


@contextlib.contextmanager
def episode_progress(
    datamodule: EpisodicDataModule, learners: int, desc: str = "report"
) -> Iterator[None]:
    """A tqdm bar over ``learners`` × the test episodes while :func:`compare` measures them.

    :func:`compare` reads ``datamodule.test_dataloader()`` once per learner; inside this context
    that loader counts the tasks of each batch it hands out (``[T]`` per episode batch), so a
    30-40 s report is no longer silent. The data module is left as it was afterwards.
    """
    from tqdm.auto import tqdm

    loaders = datamodule.test_dataloader
    per_learner = getattr(datamodule, "test_episodes", None)
    bar = tqdm(total=learners * per_learner if per_learner else None, desc=desc, unit="episode")

    def counting() -> Iterator[Any]:
        for batch in loaders():
            yield batch
            bar.update(len(batch.support_x))

    datamodule.test_dataloader = counting  # type: ignore[method-assign]
    try:
        yield
    finally:
        del datamodule.test_dataloader  # the class's method again
        bar.close()


def _learners_from_checkpoints(specs: list[str]) -> dict[str, Measured]:
    """``[NAME=]CHECKPOINT`` entries -> rows; a distillation checkpoint gives its teachers too."""
    learners: dict[str, Measured] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else ("", spec)
        checkpoint = read_checkpoint(path)
        if checkpoint.kind == "distillation":
            rows = checkpoint_learners(checkpoint)
            if name:  # the student's row takes the given name
                rows[name] = rows.pop("distilled student")
            learners.update(rows)
        else:
            learners[name or checkpoint.label] = checkpoint.learner()
    return learners


def check_report_data(
    learners: Mapping[str, Measured], datamodule: EpisodicDataModule, source: str
) -> None:
    """Raise a ValueError naming the settings to change when ``--data`` cannot feed a learner."""
    for name, measured in learners.items():
        members = measured.learners if isinstance(measured, TeacherEnsemble) else [measured]
        for learner in members:
            fixes = data_fixes(learner, datamodule)
            if fixes:
                settings = ", ".join(f"{k}: {v}" for k, v in fixes.items())
                mismatch = describe_mismatch(learner, datamodule, repr(name))
                raise ValueError(f"{mismatch}; set {settings} in {source}'s data init_args.")


def report_main(argv: list[str]) -> int:
    """``metakd report``: compare checkpoints on the same fixed test episodes (:func:`compare`)."""
    import yaml

    from lightning_metakd.command_errors import fail
    from lightning_metakd.command_line import report_parser

    parser = report_parser()
    opts = parser.parse_args(argv)
    try:
        config = yaml.safe_load(Path(opts.config).read_text()) or {}
        data = copy.deepcopy(data_section(opts.data) if opts.data else config.get("data") or {})
        if not data:
            raise ValueError(
                f"{opts.config} has no `data:` section to take the test episodes from."
            )
        init_args = data.setdefault("init_args", {})
        for key in ("test_ways", "grouping"):
            if getattr(opts, key) is not None:
                init_args[key] = getattr(opts, key)
        datamodule = report_datamodule(data)
        datamodule.prepare_data()
        learners = _learners_from_checkpoints(opts.checkpoint)
        if opts.data:
            check_report_data(learners, datamodule, opts.data)
        with episode_progress(datamodule, len(learners)):
            rows = compare(
                learners, datamodule, opts.out, repeats=opts.repeats, reference=opts.reference
            )
    except (OSError, ValueError, TypeError, KeyError) as err:
        return fail("metakd report", err)
    print(markdown_table(rows))
    print(f"written {Path(opts.out) / 'report.json'}, report.md, report.png")
    return 0


__all__ = ["check_report_data", "episode_progress", "report_datamodule", "report_main"]
