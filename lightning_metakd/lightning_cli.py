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
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI

from lightning_metakd.callbacks import BestAndLastCheckpoint
from lightning_metakd.command_line import UsageError, explain_config_error
from lightning_metakd.data import EpisodicDataModule
from lightning_metakd.modules import CheckpointError, checkpoint_file, read_checkpoint
from lightning_metakd.pretrained.registry import name_of

#: ``DistillationModule`` weight arguments of lightning-metakd 0.1 and the terms they became.
LEGACY_WEIGHTS = {
    "task_weight": "TaskLoss",
    "soft_label_weight": "SoftLabels",
    "feature_weight": "FeatureHints",
    "attention_transfer_weight": "AttentionTransfer",
    "attention_weight": "AttentionDistillation",
    "anchor_weight": "ParameterAnchor",
}
#: Their other arguments: ``{argument: (term, term argument)}``.
LEGACY_OPTIONS = {
    "temperature": ("SoftLabels", "temperature"),
    "attention_kind": ("AttentionDistillation", "kind"),
    "layer_map": ("AttentionDistillation", "layer_map"),
    "feature_taps": ("FeatureHints", "student_taps"),
}


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
    ``replaced_data``: the data came from ``--data <yaml>`` (:func:`replace_data_args`); then
    ``validate``, ``test`` and ``predict`` first check that it can feed the model's learner
    (:func:`check_replaced_data`), with a message in flags.
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


def legacy_terms_yaml(init_args: dict[str, Any]) -> str | None:
    """The ``terms:`` YAML that replaces 0.1's weight arguments in ``init_args``, or ``None``.

    Example:
        >>> print(legacy_terms_yaml({"soft_label_weight": 1.0, "temperature": 4.0}))
        terms:
        - class_path: lightning_metakd.distill.TaskLoss
          init_args:
            weight: 1.0
        - class_path: lightning_metakd.distill.SoftLabels
          init_args:
            weight: 1.0
            temperature: 4.0
        <BLANKLINE>
    """
    if not any(k in LEGACY_WEIGHTS or k in LEGACY_OPTIONS for k in init_args):
        return None
    weights = {"task_weight": 1.0, "soft_label_weight": 1.0}  # 0.1's defaults
    weights.update({k: v for k, v in init_args.items() if k in LEGACY_WEIGHTS})
    terms = {LEGACY_WEIGHTS[k]: {"weight": v} for k, v in weights.items() if v}
    for key, (term, arg) in LEGACY_OPTIONS.items():
        if key in init_args and term in terms:
            if key == "feature_taps":  # [student path, teacher path(s)]
                taps = list(init_args[key])
                terms[term].update(student_taps=taps[:1], teacher_taps=taps[1:])
            else:
                terms[term][arg] = init_args[key]
    entries = [
        {"class_path": f"lightning_metakd.distill.{term}", "init_args": args}
        for term, args in terms.items()
    ]
    return yaml.safe_dump({"terms": entries}, sort_keys=False)


def check_legacy_config(args: list[str] | None) -> None:
    """Stop with the new YAML when a ``--config`` names 0.1's DistillationModule weight arguments."""
    argv = list(sys.argv[1:] if args is None else args)
    configs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
    configs += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    for config in configs:
        try:
            data = yaml.safe_load(Path(config).read_text())
        except (OSError, yaml.YAMLError):
            continue  # the CLI itself reports a missing or broken file
        model = data.get("model") if isinstance(data, dict) else None
        init_args = model.get("init_args") if isinstance(model, dict) else None
        distiller = isinstance(model, dict) and str(model.get("class_path", "")).endswith(
            "DistillationModule"
        )
        if not distiller or not isinstance(init_args, dict):
            continue
        replacement = legacy_terms_yaml(init_args)
        if replacement is not None:
            old = [k for k in init_args if k in LEGACY_WEIGHTS or k in LEGACY_OPTIONS]
            indented = "".join(f"    {line}\n" for line in replacement.splitlines())
            print(
                f"metakd: error: {config}: {', '.join(old)} are arguments of lightning-metakd "
                f"0.1; distillation terms are now a list. Replace them under model.init_args "
                f"with:\n{indented}",
                file=sys.stderr,
            )
            raise SystemExit(2)


def check_sizes(model: Any, datamodule: Any) -> None:
    """Fail before any data is prepared (a KanjiVG render takes minutes) when the data's
    ``image_size`` cannot feed the model's learner or, for a distiller, its teachers.

    Teachers given as checkpoint paths are read here (cheap); channels are checked at ``setup``,
    once the data knows them.
    """
    size = getattr(datamodule, "image_size", None)
    learner = getattr(model, "learner", None)
    if learner is None or not isinstance(size, int):
        return
    if hasattr(model, "prepare"):
        model.prepare()
    teachers = list(getattr(model, "teachers", []))
    named = [(getattr(model, "learner_name", "learner"), learner)]
    named += [
        ("teacher" if len(teachers) == 1 else f"teacher {k}", t) for k, t in enumerate(teachers)
    ]
    for who, each in named:
        built = getattr(each.backbone, "image_size", None)
        if isinstance(built, int) and built != size:
            raise ValueError(
                f"the {who}'s backbone was built for {built}x{built} images but the data has "
                f"image_size={size}; set --data.init_args.image_size {built} (checked before "
                "the data is rendered or read)."
            )


def data_section(path: str | Path) -> dict[str, Any]:
    """The data module a YAML names: the ``data:`` section of a config, or a data-only YAML.

    A data-only YAML holds ``class_path`` (and ``init_args``) at its top level. What
    ``--data <yaml>`` of ``metakd fit|validate|test|predict`` and ``metakd report --data`` read:
    any shipped config (``configs/omniglot/protonet_5way_1shot.yaml``) gives its data.

    Raises:
        ValueError: no such file, not YAML, or neither a ``data:`` section nor a ``class_path``.
    """
    path = Path(path).expanduser()
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ValueError(f"--data {path}: cannot read it ({err.strerror or err}).") from None
    except yaml.YAMLError as err:
        raise ValueError(f"--data {path}: not valid YAML ({err}).") from None
    section = data.get("data") if isinstance(data, dict) and "class_path" not in data else data
    if not isinstance(section, dict) or "class_path" not in section:
        raise ValueError(
            f"--data {path}: it has no `data:` section with a class_path; pass a config that has "
            "one (e.g. configs/omniglot/protonet_5way_1shot.yaml), or a YAML holding only "
            "`class_path: lightning_metakd.data.FolderDataModule` and its `init_args:`."
        )
    return section


def replace_data_args(args: list[str]) -> list[str]:
    """``args`` with each ``--data <yaml file>`` made to replace the ``--config``'s data whole.

    jsonargparse reads ``--data other.yaml`` only when the file holds nothing but the data's
    ``class_path``/``init_args``, and then keeps every ``init_args`` of the earlier data that the
    new class accepts (a KanjiVG config's ``grouping: radical``, ``test_ways``, ``val_episodes``
    ...). Here the file may be a whole config (its ``data:`` section is taken, see
    :func:`data_section`), and ``--data null`` goes first so that nothing carries over; flags after
    it (``--data.init_args.test_ways 20``) still apply on top.

    Example:
        >>> replace_data_args(["test", "--data", "lightning_metakd.data.KanjiDataModule"])
        ['test', '--data', 'lightning_metakd.data.KanjiDataModule']
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg, value = args[i], None
        if arg == "--data" and i + 1 < len(args):
            value, step = args[i + 1], 2
        elif arg.startswith("--data="):
            value, step = arg.split("=", 1)[1], 1
        if value is not None and value.lower().endswith((".yaml", ".yml")):
            out += ["--data", "null", "--data", json.dumps(data_section(value))]
            i += step
            continue
        out.append(arg)
        i += 1
    return out


def data_fixes(learner: Any, datamodule: EpisodicDataModule, stage: str = "test") -> dict[str, int]:
    """The data settings that make ``datamodule``'s images fit ``learner``; ``{}`` when they do.

    Compares the learner's backbone (``image_size``, ``in_channels``) with the data module
    (``image_size``; its channels after ``setup``, which this calls). A size always fits after
    ``image_size`` changes (images are resized); channels fit when the data module converts them
    (a ``channels`` argument: FolderDataModule, Learn2LearnDataModule), and cannot otherwise
    (Omniglot is grey, mini-ImageNet RGB). Example: ``{"image_size": 28, "channels": 1}``.

    Raises:
        ValueError: the channels differ and the data module cannot convert them.
    """
    backbone = getattr(learner, "backbone", None)
    size, channels = getattr(backbone, "image_size", None), getattr(backbone, "in_channels", None)
    datamodule.prepare_data()
    datamodule.setup(stage)
    fixes = {}
    if isinstance(size, int) and size != datamodule.image_size:
        fixes["image_size"] = size
    if isinstance(channels, int) and channels != datamodule.channels:
        name = type(datamodule).__name__
        if "channels" not in inspect.signature(type(datamodule)).parameters:
            raise ValueError(
                f"{name} serves {datamodule.channels}-channel images and has no channels "
                f"setting, so a {channels}-channel learner cannot be tested on it; read the "
                f"images with lightning_metakd.data.FolderDataModule (channels: {channels}) instead."
            )
        fixes["channels"] = channels
    return fixes


def describe_mismatch(learner: Any, datamodule: EpisodicDataModule, who: str) -> str:
    """``"--data gives 3-channel 84x84 images but <who> takes 1-channel 28x28"``."""
    backbone = learner.backbone
    size = getattr(backbone, "image_size", "?")
    return (
        f"--data gives {datamodule.channels}-channel {datamodule.image_size}x"
        f"{datamodule.image_size} images but {who} takes "
        f"{getattr(backbone, 'in_channels', '?')}-channel {size}x{size}"
    )


def check_replaced_data(model: L.LightningModule, datamodule: Any, stage: str) -> None:
    """Raise a ValueError naming the flags to add when ``--data``'s images cannot feed the model.

    See :func:`data_fixes`; models without a ``learner`` and foreign data modules pass.
    """
    learner = getattr(model, "learner", None)
    if getattr(learner, "backbone", None) is None or not isinstance(datamodule, EpisodicDataModule):
        return
    fixes = data_fixes(learner, datamodule, stage)
    if fixes:
        flags = " ".join(f"--data.init_args.{k} {v}" for k, v in fixes.items())
        mismatch = describe_mismatch(learner, datamodule, "the checkpoint's learner")
        raise ValueError(f"{mismatch}; add {flags} after --data.")


def run_lightning_cli(args: list[str] | None = None, run: bool = True) -> MetaKDCLI:
    """Run (or, with ``run=False``, only build) the LightningCLI on ``args`` (default: the console's).

    ``--data <yaml>`` takes the data module of another config whole (:func:`replace_data_args`):
    a checkpoint is tested on data it was not trained on, its image size and channels checked at
    setup (``Learner.check_data``).

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
