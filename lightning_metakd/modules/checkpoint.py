"""The one checkpoint reader: what kind of checkpoint a file is, and the learners inside it.

Every place that takes a checkpoint path — ``metakd test --ckpt_path``, a distillation teacher,
the pipeline, ``metakd report``, ``metakd finetune``, export — reads it here, so a missing,
truncated or foreign file, or a checkpoint of the other module type, gets the same clear message
everywhere. Files load with ``torch.load(weights_only=True)``: no pickled code is executed.

A path may name a model shipped in the package, ``pretrained:<name>``
(:mod:`lightning_metakd.pretrained`): :func:`checkpoint_file` turns it into the shipped file, so
it works wherever a path does. :meth:`Checkpoint.stripped` writes the shipped form of a run's
checkpoint: its learner (a distillation run's student alone) without the training state.

Two kinds, told apart by their ``metakd_components``:

- ``"learner"``: a :class:`~lightning_metakd.modules.MetaLearnerModule` — one learner (the
  state under ``learner.``);
- ``"distillation"``: a :class:`~lightning_metakd.modules.DistillationModule` — the student
  (``student.``), its teachers (``teachers.<k>.``) and its terms (``terms.<i>.``).

Checkpoints of lightning-metakd 0.1 (format 1: no ``metakd_format`` entry) are read too: their
learners load, and a meta-learner checkpoint is upgraded in place when a module loads it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_metakd.algorithms import Learner
from lightning_metakd.pretrained.registry import UnknownPretrainedModel, name_of, weights_file
from lightning_metakd.spec import build_component

#: The layout version of the checkpoints the modules write (``metakd_format``; 0.1 had none: 1).
FORMAT_VERSION = 2
#: Module classes by checkpoint kind (their class paths; users' subclasses record their own).
MODULES = {
    "learner": "lightning_metakd.modules.MetaLearnerModule",
    "distillation": "lightning_metakd.modules.DistillationModule",
}
#: The config to name in messages, by kind.
EXAMPLE_CONFIGS = {
    "learner": "configs/kanji/protonet.yaml",
    "distillation": "configs/kanji/distill_protonet.yaml",
}
_LEARNER_SETTINGS = ("vmap_tasks", "task_chunk_size")
#: The hyper-parameters a stripped checkpoint keeps: ``MetaLearnerModule``'s plain arguments.
_MODULE_SETTINGS = ("ways", "normalization", *_LEARNER_SETTINGS, "allow_tf32", "tune_cpu_allocator")
_MISSING = (
    "pass the best.ckpt (or last.ckpt) that `metakd fit` wrote under "
    "runs/<name>/version_<N>/checkpoints/, or pretrained:<name> (`metakd pretrained` lists them)."
)


class CheckpointError(ValueError):
    """A file that is not the checkpoint it should be; the message names the file and the fix."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """No file at a checkpoint path (a ``CheckpointError`` and a ``FileNotFoundError``)."""


def checkpoint_file(path: str | Path, what: str = "checkpoint", advice: str | None = None) -> Path:
    """The file a checkpoint path means, checked to exist: every reader of a path calls this.

    ``pretrained:<name>`` is the shipped file of that model; any other path is expanded (``~``).

    Args:
        path: a ``.ckpt`` path or ``pretrained:<name>``.
        what: what the file is, for the message (``"teacher checkpoint"``).
        advice: what to do when it is missing (default: where ``metakd fit`` writes checkpoints).

    Raises:
        CheckpointError: an unknown pretrained name (the message lists the shipped ones).
        MissingCheckpointError: no such file.
    """
    name = name_of(path)
    if name is not None:
        try:
            return weights_file(name)
        except UnknownPretrainedModel as err:
            raise CheckpointError(str(err)) from None
        except FileNotFoundError as err:
            raise MissingCheckpointError(str(err)) from None
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingCheckpointError(f"No {what} at {file}; {advice or _MISSING}")
    return file


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _learner_state_v1(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """A 0.1 ``MetaLearnerModule``'s state (``model.*``, ``algorithm.*``) as a Learner's."""
    return {
        k: v
        for k, v in _strip(state, prefix).items()
        if k.startswith("model.") or k.startswith("algorithm.")
    }


@dataclass
class Checkpoint:
    """A checked lightning-metakd checkpoint (see :func:`read_checkpoint`)."""

    path: Path
    kind: str  #: ``"learner"`` or ``"distillation"``
    version: int  #: the layout version (1: lightning-metakd 0.1)
    components: dict[str, Any]
    hyper_parameters: dict[str, Any]
    state_dict: dict[str, Any]
    pretrained: str | None = None  #: the name it was given as (``pretrained:<name>``), if shipped

    @property
    def module_class(self) -> str:
        """The class path of the LightningModule that wrote it."""
        return self.components.get("module", MODULES[self.kind])

    @property
    def label(self) -> str:
        """What tables call it: the shipped model's name, else the folder above its
        ``checkpoints/`` (``version_<N>``)."""
        return self.pretrained or self.path.parent.parent.name

    # -- learners ---------------------------------------------------------------------------------
    def _build(self, spec: Mapping[str, Any], state: Mapping[str, Any], **settings: Any) -> Learner:
        learner = Learner.from_components(spec, **settings)
        learner.load_state_dict(dict(state))
        return learner.eval()

    def learner(self) -> Learner:
        """The learner of a ``"learner"`` checkpoint, or the student of a distillation one."""
        settings = {k: self.hyper_parameters.get(k) for k in _LEARNER_SETTINGS}
        if self.kind == "distillation":
            return self.student()
        if self.version == 1:
            spec = {**self.components, "ways": self.hyper_parameters["ways"]}
            return self._build(spec, _learner_state_v1(self.state_dict, ""), **settings)
        return self._build(
            self.components["learner"], _strip(self.state_dict, "learner."), **settings
        )

    def student(self) -> Learner:
        """The distilled student (a ``"distillation"`` checkpoint only)."""
        self._require("distillation", "student")
        settings = {k: self.hyper_parameters.get(k) for k in _LEARNER_SETTINGS}
        if self.version == 1:
            spec = {
                "backbone": self.components["student_backbone"],
                "algorithm": self.components["student_algorithm"],
                "ways": self.hyper_parameters["ways"],
            }
            return self._build(spec, _learner_state_v1(self.state_dict, "student."), **settings)
        return self._build(
            self.components["student"], _strip(self.state_dict, "student."), **settings
        )

    def teachers(self) -> list[Learner]:
        """The teachers stored in a ``"distillation"`` checkpoint, in order, each with its own
        normalisation policy (as trained and tested; ``own_normalization`` in its spec where
        distillation used another)."""
        self._require("distillation", "teachers")
        if self.version == 1:
            specs = self.components.get("teachers", [self.components["teacher"]])
            prefixes = ["teacher.", *(f"teacher_{k}." for k in range(1, len(specs)))]
            return [
                self._build(spec, _learner_state_v1(self.state_dict, prefix))
                for spec, prefix in zip(specs, prefixes, strict=True)
            ]
        return [
            _own_policy(self._build(spec, _strip(self.state_dict, f"teachers.{k}.")), spec)
            for k, spec in enumerate(self.components["teachers"])
        ]

    def _require(self, kind: str, what: str) -> None:
        if self.kind != kind:
            raise CheckpointError(
                f"{self.path} is a {self.module_class.rpartition('.')[2]} checkpoint, which has "
                f"no {what}; its learner loads with load_learner({str(self.path)!r})."
            )

    def stripped(self, **provenance: Any) -> dict[str, Any]:
        """Its learner as the smallest ``MetaLearnerModule`` checkpoint: what the package ships.

        The learner's state and components, the module's plain hyper-parameters and the
        ``pytorch-lightning_version`` that Lightning's loader reads; no optimiser, scheduler, loop
        or callback state. A distillation checkpoint gives its *student* alone (the teachers'
        weights stay behind), so it loads as a meta-learner: ``load_learner``, ``metakd test
        --config configs/kanji/protonet_conv4_16.yaml --ckpt_path`` and as a teacher. Keyword
        arguments are kept under ``metakd_pretrained`` (plain values: where it came from).
        """
        learner = self.learner()
        raw = torch.load(self.path, map_location="cpu", weights_only=True)
        settings = {**self.hyper_parameters, "normalization": learner.normalization}
        return {
            "pytorch-lightning_version": raw.get("pytorch-lightning_version", "2.0.0"),
            "epoch": raw.get("epoch", 0),
            "global_step": raw.get("global_step", 0),
            "hparams_name": "kwargs",
            "hyper_parameters": {
                "_class_path": MODULES["learner"],
                **{k: settings[k] for k in _MODULE_SETTINGS if k in settings},
            },
            "state_dict": {
                f"learner.{k}": v.detach().clone() for k, v in learner.state_dict().items()
            },
            "metakd_components": {
                "kind": "learner",
                "module": MODULES["learner"],
                "learner": learner.components(),
            },
            "metakd_format": FORMAT_VERSION,
            "metakd_pretrained": {"source_kind": self.kind, **provenance},
        }

    # -- the module -------------------------------------------------------------------------------
    def module_arguments(self) -> dict[str, Any]:
        """The constructor arguments a module needs beyond its hyper-parameters: the components."""
        if self.version == 1 and self.kind == "distillation":
            raise CheckpointError(
                f"{self.path} is a DistillationModule checkpoint of lightning-metakd 0.1, whose "
                "distillation terms were keyword weights; it cannot be resumed or re-tested as a "
                "module. Its student and teachers still load: load_learner(path) (the student), "
                "`metakd report --checkpoint <it>`, `metakd finetune --checkpoint <it>`."
            )
        if self.kind == "learner":
            learner = self.components if self.version == 1 else self.components["learner"]
            return {
                "backbone": build_component(learner["backbone"]),
                "algorithm": build_component(learner["algorithm"]),
            }
        teachers = [
            _own_policy(Learner.from_components(spec), spec) for spec in self.components["teachers"]
        ]
        student = self.components["student"]
        return {
            "teacher": teachers if len(teachers) > 1 else teachers[0],
            "student_backbone": build_component(student["backbone"]),
            "student_algorithm": build_component(student["algorithm"]),
            "terms": [build_component(spec) for spec in self.components["terms"]],
        }


def _own_policy(teacher: Learner, spec: Mapping[str, Any]) -> Learner:
    """A teacher built (and loaded) with the policy it was distilled with, given back its own
    where ``teacher_normalization="auto"`` had replaced it: the teacher as trained and tested."""
    if spec.get("own_normalization"):
        teacher.normalization = spec["own_normalization"]
    return teacher


def read_checkpoint(path: str | Path, expect: str | None = None) -> Checkpoint:
    """Read and check a lightning-metakd checkpoint.

    Args:
        path: the ``.ckpt`` file, or ``pretrained:<name>`` (a model shipped in the package).
        expect: the kind (``"learner"``/``"distillation"``, a module class's
            ``checkpoint_kind``) the checkpoint must be of; a checkpoint of the other kind raises
            an error that names its kind and the config to use.

    Raises:
        CheckpointError: no such file, an unknown pretrained name, an unreadable (e.g. truncated)
            file, a file that is not a lightning-metakd checkpoint, or one of the other kind.
    """
    pretrained = name_of(path)
    path = checkpoint_file(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated, or not a checkpoint: "
            f"{reason}); use another checkpoint, e.g. last.ckpt beside it, or train again."
        ) from None
    components = raw.get("metakd_components") if isinstance(raw, dict) else None
    if not isinstance(components, dict) or not components:
        what = (
            "a FixedClassifier file (use it with `metakd export --classifier`)"
            if isinstance(raw, dict) and raw.get("format") == "lightning_metakd.FixedClassifier"
            else "not a lightning-metakd checkpoint (it names no learner components)"
        )
        raise CheckpointError(
            f"{path} is {what}; pass a checkpoint that `metakd fit` wrote for a MetaLearnerModule "
            "or a DistillationModule."
        )
    version = int(raw.get("metakd_format", 1))
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} was written by a newer lightning-metakd (checkpoint format {version}); "
            "upgrade the package."
        )
    if version == 1:
        kind = "distillation" if "student_backbone" in components else "learner"
    else:
        kind = components.get("kind", "")
    if kind not in MODULES:
        raise CheckpointError(f"{path} names an unknown kind of checkpoint {kind!r}.")
    checkpoint = Checkpoint(
        path,
        kind,
        version,
        components,
        dict(raw.get("hyper_parameters") or {}),
        raw["state_dict"],
        pretrained,
    )
    if expect is not None:
        wanted = expect
        if wanted != kind:
            found = checkpoint.module_class.rpartition(".")[2]
            raise CheckpointError(
                f"{path} is a {found} checkpoint, not a {MODULES[wanted].rpartition('.')[2]} one; "
                f"test it with a config whose model is a {found} (e.g. "
                f"{EXAMPLE_CONFIGS[kind]}), or load its learner with load_learner(path)."
            )
    return checkpoint


def load_learner(path: str | Path) -> Learner:
    """The learner of a checkpoint: a meta-learner's, or the student of a distillation checkpoint.

    Example::

        learner = load_learner("runs/kanji-protonet/version_0/checkpoints/best.ckpt")
        learner = load_learner("pretrained:kanji-student-conv4-16")  # shipped in the package
        state = learner.adapt(support_x, support_y)
        predicted = learner.predict(state, query_x).argmax(-1)
    """
    return read_checkpoint(path).learner()


def load_module(path: str | Path, map_location: Any = "cpu") -> Any:
    """The LightningModule that wrote ``path`` (its own class, users' subclasses included)."""
    checkpoint = read_checkpoint(path)
    module, _, name = checkpoint.module_class.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    return cls.load_from_checkpoint(checkpoint.path, map_location=map_location)


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Bring a loaded checkpoint dict to the current layout in place (``on_load_checkpoint``)."""
    if int(checkpoint.get("metakd_format", 1)) >= FORMAT_VERSION:
        return
    components = checkpoint.get("metakd_components") or {}
    if "student_backbone" in components:
        raise CheckpointError(
            "this is a DistillationModule checkpoint of lightning-metakd 0.1, whose distillation "
            "terms were keyword weights; it cannot be resumed as a module. Its student loads with "
            "load_learner(path)."
        )
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = {f"learner.{k}": v for k, v in _learner_state_v1(state, "").items()}
    ways = (checkpoint.get("hyper_parameters") or {}).get("ways")
    checkpoint["metakd_components"] = {
        "kind": "learner",
        "module": MODULES["learner"],
        "learner": {**components, "ways": ways},
    }
    checkpoint["metakd_format"] = FORMAT_VERSION


__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "MissingCheckpointError",
    "checkpoint_file",
    "load_learner",
    "load_module",
    "read_checkpoint",
    "upgrade_checkpoint",
]
