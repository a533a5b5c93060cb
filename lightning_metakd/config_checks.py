"""What ``metakd fit|validate|test|predict`` checks and rewrites in a config before Lightning builds it.

The checks of :class:`~lightning_metakd.lightning_cli.MetaKDCLI` that need no LightningCLI, so
that other commands (``metakd report --data``) use them too:

- a ``--config`` that still names lightning-metakd 0.1's ``DistillationModule`` weight arguments
  stops with the ``terms:`` YAML that replaces them (:func:`check_legacy_config`);
- ``--data <yaml>`` takes the data module of another config whole (:func:`replace_data_args`,
  :func:`data_section`), and that data is checked against the checkpoint's learner with the flags
  that would make it fit (:func:`data_fixes`, :func:`check_replaced_data`);
- the data's ``image_size`` is checked against the model's backbones before any data is prepared
  (:func:`check_sizes`).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from lightning_metakd.data import EpisodicDataModule

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


__all__ = [
    "LEGACY_OPTIONS",
    "LEGACY_WEIGHTS",
    "check_legacy_config",
    "check_replaced_data",
    "check_sizes",
    "data_fixes",
    "data_section",
    "describe_mismatch",
    "legacy_terms_yaml",
    "replace_data_args",
]
