"""The LightningCLI of ``metakd fit|validate|test|predict``: its defaults, checkpoints and runs.

Built here, below both :mod:`lightning_metakd.pipeline` (whose training stages run through it) and
:mod:`lightning_metakd.cli` (the ``metakd`` command), so neither imports the other.

Besides Lightning's own CLI, :class:`MetaKDCLI`:

- checks ``--ckpt_path`` with :func:`~lightning_metakd.modules.read_checkpoint` before Lightning
  opens it: a missing or truncated file, or a checkpoint of the other module type than the
  config's model, is one clear error that names the file and the config to use;
  ``--ckpt_path pretrained:<name>`` is the shipped model's file (:mod:`lightning_metakd.pretrained`);
- resolves ``--ckpt_path last`` (and ``best``) to the latest run of the config's logger
  (``runs/<name>/version_<N>/checkpoints/last.ckpt``), or refuses with a message;
- keeps a run in one folder: resuming from a run's checkpoint logs into that run's
  ``version_<N>`` (its ``best.ckpt`` and best score carry on), ``metakd test|validate|predict``
  of a run's checkpoint logs into that run too (its config as ``<command>_config.yaml``), and a
  ``fit`` that fails before writing a checkpoint removes the folder it opened, so that the next
  run is ``version_0`` again;
- turns a config mistake into one line (:class:`~lightning_metakd.command_line.UsageError`, with
  "did you mean ...?" for a misspelt key) instead of ~60 lines of usage.

What it checks in a config before building anything (0.1's distillation arguments, ``--data
<yaml>``, image sizes) lives in :mod:`lightning_metakd.config_checks`.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from lightning_metakd.callbacks import BestAndLastCheckpoint
from lightning_metakd.command_errors import UsageError, explain_config_error
from lightning_metakd.config_checks import (
    LEGACY_OPTIONS,
    LEGACY_WEIGHTS,
    check_legacy_config,
    check_replaced_data,
    check_sizes,
    data_fixes,
    data_section,
    describe_mismatch,
    legacy_terms_yaml,
    replace_data_args,
)
from lightning_metakd.data import EpisodicDataModule
from lightning_metakd.modules import CheckpointError, checkpoint_file, read_checkpoint
from lightning_metakd.pretrained.registry import name_of

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


#: ``--ckpt_path`` values Lightning resolves itself, from its own state, not from a file.
LIGHTNING_CHECKPOINT_NAMES = ("hpc", "registry")


def _dests(parser: Any) -> list[str]:
    """Every option name of a jsonargparse parser and its subcommands' (``trainer.max_epochs``, ...)."""
    names = [a.dest for a in parser._actions if a.dest and a.dest != "help"]
    subcommands = getattr(parser, "_subcommands_action", None)
    for subparser in subcommands._name_parser_map.values() if subcommands is not None else ():
        names += _dests(subparser)
    return names


@contextlib.contextmanager
def one_line_errors(parser: Any, prefix: str = "") -> Iterator[None]:
    """Turn jsonargparse's "usage ... error: <message>" exit into a :class:`UsageError`.

    jsonargparse prints the whole usage (~60 lines for ``metakd fit``) before its error, and the
    error itself spreads over nested "Does not validate against any of the Union subtypes"
    blocks; the message here is :func:`~lightning_metakd.command_line.explain_config_error` of
    it: the key, what is wrong, and the closest valid key. ``--help`` and ``--print_config`` (exit
    status 0) pass through untouched.
    """
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except SystemExit as exit_:
        text = captured.getvalue()
        if exit_.code in (0, None) or isinstance(exit_, UsageError):
            sys.stderr.write(text)
            raise
        start = text.find("\nerror: ") + 1 if "\nerror: " in text else 0
        message = text[start:].removeprefix("error: ")
        raise UsageError(prefix + explain_config_error(message.strip(), _dests(parser))) from None
    sys.stderr.write(captured.getvalue())


class MetaKDCLI(LightningCLI):
    """LightningCLI with a checkpoint on the best ``val/acc`` and the last step, always on.

    See the module docstring for what it adds: checked checkpoints, ``--ckpt_path last``, one
    folder per run, one-line config errors, image sizes checked before the data is prepared.
    ``replaced_data``: the data came from ``--data <yaml>`` (:func:`~lightning_metakd.
    config_checks.replace_data_args`); then ``validate``, ``test`` and ``predict`` first check that
    it can feed the model's learner (:func:`~lightning_metakd.config_checks.check_replaced_data`),
    with a message in flags.
    """

    def __init__(self, *args: Any, replaced_data: bool = False, **kwargs: Any) -> None:
        self.replaced_data = replaced_data
        super().__init__(*args, **kwargs)

    def _check_data(self, stage: str) -> None:
        if not self.replaced_data:
            return
        # Lightning refuses to log module and data hyper-parameters that share a key with other
        # values (`ways`: the learner's training tasks vs the other data's); the data's stay in
        # the run's config.yaml and in HyperparameterMetrics' data.* entries.
        self.datamodule._log_hyperparams = False
        if stage == "fit":
            return
        try:
            check_replaced_data(self.model, self.datamodule, stage)
        except ValueError as err:
            print(f"metakd {stage}: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def before_fit(self) -> None:
        self._check_data("fit")
        check_sizes(self.model, self.datamodule)

    def before_validate(self) -> None:
        self._check_data("validate")
        check_sizes(self.model, self.datamodule)

    def before_test(self) -> None:
        self._check_data("test")
        check_sizes(self.model, self.datamodule)

    def before_predict(self) -> None:
        self._check_data("predict")
        check_sizes(self.model, self.datamodule)

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

    # -- parsing ----------------------------------------------------------------------------------
    def parse_arguments(self, parser, args) -> None:  # noqa: ANN001 - jsonargparse parser
        """Parse ``args`` into ``self.config``; a mistake raises a one-line :class:`UsageError`.

        Unlike Lightning's, it does not warn that ``args`` and ``sys.argv`` are both given: the
        ``metakd`` command and the pipeline pass ``args`` on purpose.
        """
        with one_line_errors(parser):
            if isinstance(args, dict | Namespace):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` (resolving ``last``/``best``), then let Lightning read its
        hyper-parameters into the config."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        path = config.get("ckpt_path")
        if path is None or str(path).split(":")[0] in LIGHTNING_CHECKPOINT_NAMES:
            return
        if path in ("last", "best"):
            path = self._named_checkpoint(subcommand, config, path)
            print(
                f"metakd {subcommand}: --ckpt_path {config['ckpt_path']} is {path}",
                file=sys.stderr,
                flush=True,
            )
        if subcommand == "fit" and name_of(path) is not None:
            raise CheckpointError(
                f"--ckpt_path {path}: a shipped model holds no training state to resume; test it "
                "(metakd test --ckpt_path), distil from it (model.teacher), or fine-tune it "
                "(metakd finetune --checkpoint)."
            )
        path = checkpoint_file(path)  # pretrained:<name> → the shipped file; one message if missing
        kind = getattr(_model_class(config), "checkpoint_kind", "")
        if kind:
            read_checkpoint(path, expect=kind)  # one message for truncated, foreign files
        config["ckpt_path"] = str(path)
        with one_line_errors(self.parser, prefix=f"{path}: its hyper-parameters do not fit: "):
            super()._parse_ckpt_path()

    def _named_checkpoint(self, subcommand: str, config: Namespace, name: str) -> Path:
        """The file ``--ckpt_path last|best`` means: in ``checkpoint.dirpath`` when it is set, else
        in the latest ``version_<N>`` of the logger's folder that has one."""
        file = "last.ckpt" if name == "last" else f"{config.checkpoint.filename or 'best'}.ckpt"
        if config.checkpoint.dirpath:
            path = Path(config.checkpoint.dirpath) / file
            if path.is_file():
                return path
            raise CheckpointError(
                f"--ckpt_path {name}: there is no {path}; pass the path of the checkpoint to use."
            )
        run = _logger_run(config)
        if run is None:
            raise CheckpointError(
                f"--ckpt_path {name} looks in the logger's run folders, and this config has no "
                "TensorBoard or CSV logger; pass the path of the checkpoint to use."
            )
        root, version = run
        runs = [root / _version_folder(version)] if version is not None else _versions(root)
        found = [
            run / "checkpoints" / file for run in runs if (run / "checkpoints" / file).is_file()
        ]
        if not found:
            where = runs[0] if version is not None else root / "version_*"
            raise CheckpointError(
                f"--ckpt_path {name}: no {where / 'checkpoints' / file} to "
                f"{'resume' if subcommand == 'fit' else subcommand}; run `metakd fit` without "
                "--ckpt_path first, or pass the path of the checkpoint to use."
            )
        return found[-1]

    # -- one folder per run -----------------------------------------------------------------------
    def before_instantiate_classes(self) -> None:
        """Log into the run a ``--ckpt_path`` belongs to; name a non-fit config after its command."""
        subcommand = self.subcommand
        if subcommand is None:
            return
        config = self.config[subcommand]
        trainer = config.get("trainer")
        if trainer is not None and trainer.get("enable_checkpointing") is False:
            raise UsageError(
                "--trainer.enable_checkpointing false: metakd always keeps best.ckpt and "
                "last.ckpt of a run (the `checkpoint` callback: --ckpt_path last, the pipeline "
                "and the report read them); drop the flag (--checkpoint.dirpath <folder> puts "
                "them elsewhere)."
            )
        if subcommand != "fit":
            self.save_config_kwargs = {
                **self.save_config_kwargs,
                "config_filename": f"{subcommand}_config.yaml",
            }
        run = _logger_run(config)
        path = config.get("ckpt_path")
        if run is None or run[1] is not None or path is None:
            return
        checkpoint = Path(path).expanduser().resolve()
        folder = checkpoint.parent.parent
        if checkpoint.parent.name == "checkpoints" and folder.parent == run[0].resolve():
            match = re.fullmatch(r"version_(\d+)", folder.name)
            config.trainer.logger.init_args.version = int(match[1]) if match else folder.name

    def fit(self, model: L.LightningModule, **kwargs: Any) -> None:
        """``trainer.fit``; a run that fails before writing a checkpoint removes the folder it opened.

        Otherwise the failed attempt keeps ``version_0`` (its config and an events file), the next
        run becomes ``version_1``, and paths such as ``runs/<name>/version_0/checkpoints/best.ckpt``
        point at nothing.
        """
        trainer = self.trainer
        log_dir = getattr(trainer.logger, "log_dir", None)
        folder = Path(log_dir) if log_dir else None
        opened = folder is not None and not folder.exists()
        failed = True
        try:
            with warnings.catch_warnings():
                if kwargs.get("ckpt_path"):  # resuming writes into the run's checkpoint folder
                    warnings.filterwarnings("ignore", "Checkpoint directory .* is not empty")
                trainer.fit(model, **kwargs)
            failed = trainer.interrupted
        finally:
            if failed and opened and trainer.is_global_zero:
                _remove_if_no_checkpoint(folder, trainer)


def _model_class(config: Namespace) -> type | None:
    """The class a parsed config's ``model`` names (``None`` when it is not importable)."""
    model = config.get("model")
    class_path = model.get("class_path") if isinstance(model, Namespace) else None
    if not class_path:
        return None
    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _logger_run(config: Namespace) -> tuple[Path, Any] | None:
    """``(<save_dir>/<name>, version)`` of the config's TensorBoard or CSV logger, else ``None``."""
    logger = config.get("trainer", Namespace()).get("logger")
    init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
    if not isinstance(init_args, Namespace) or init_args.get("save_dir") is None:
        return None
    if "name" not in init_args or "version" not in init_args:
        return None
    name = init_args.get("name") or ""
    return Path(init_args.save_dir) / str(name), init_args.get("version")


def _version_folder(version: Any) -> str:
    return version if isinstance(version, str) else f"version_{version}"


def _versions(root: Path) -> list[Path]:
    """``root``'s ``version_<N>`` folders in the order of ``N``."""
    found = [
        (int(m[1]), p)
        for p in root.glob("version_*")
        if (m := re.fullmatch(r"version_(\d+)", p.name))
    ]
    return [p for _, p in sorted(found)]


def _remove_if_no_checkpoint(folder: Path, trainer: L.Trainer) -> None:
    """Remove the run ``folder`` of a failed fit when neither it nor the checkpoint folder holds a
    checkpoint (nothing in it can be resumed or tested)."""
    callback = trainer.checkpoint_callback
    places = [folder, *([Path(callback.dirpath)] if getattr(callback, "dirpath", None) else [])]
    if folder.is_dir() and not any(any(p.rglob("*.ckpt")) for p in places if p.is_dir()):
        shutil.rmtree(folder, ignore_errors=True)
        print(
            f"metakd fit: removed {folder}: the run failed before writing a checkpoint",
            file=sys.stderr,
        )


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> MetaKDCLI:
    """Run (or, with ``run=False``, only build) the LightningCLI on ``args`` (default: the console's).

    ``--data <yaml>`` takes the data module of another config whole (:func:`~lightning_metakd.
    config_checks.replace_data_args`): a checkpoint is tested on data it was not trained on, its
    image size and channels checked at setup (``Learner.check_data``).

    Raises:
        UsageError: a config or flag the parser rejects (one line, with "did you mean").
        CheckpointError: a ``--ckpt_path`` that is missing, unreadable or of the other module type.
    """
    check_legacy_config(args)
    given = list(sys.argv[1:] if args is None else args)
    try:
        replaced = replace_data_args(given)
    except ValueError as err:
        print(f"metakd: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    if args is None:  # LightningCLI reads the console's arguments itself
        sys.argv[1:] = replaced
    else:
        args = replaced
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
        replaced_data=replaced != given,
    )


__all__ = [
    "DEFAULT_CALLBACKS",
    "LEGACY_OPTIONS",
    "LIGHTNING_CHECKPOINT_NAMES",
    "LEGACY_WEIGHTS",
    "TRAINER_DEFAULTS",
    "MetaKDCLI",
    "check_legacy_config",
    "check_replaced_data",
    "data_fixes",
    "describe_mismatch",
    "data_section",
    "legacy_terms_yaml",
    "one_line_errors",
    "replace_data_args",
    "run_lightning_cli",
]
