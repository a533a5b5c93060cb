"""Deployment: turn a meta-learned (or distilled) learner into a classifier for a user's classes.

- :class:`FixedClassifier`: a learner adapted once and frozen into a plain module, images →
  logits, saved and loaded without pickled code.
- :func:`finetune`: adapt on labelled images and optionally fine-tune further with the θ*-anchor;
  :func:`run_finetune` does the whole job on a folder of class folders (``metakd finetune``).
- :func:`export_classifier`: write it as ``torch.export`` and ONNX programs and check their outputs;
  :func:`load_exported` / :func:`classify` run the exported files (``metakd classify``).
- :func:`export_learner`: export the adaptation itself — ``enrol`` (support set → task state) and
  ``classify`` (queries + state → logits) graphs, so a device enrols new classes without PyTorch;
  :func:`load_exported_learner` runs them (``metakd classify --enrol``), :func:`quantize_learner`
  writes their int8 versions.
"""

from lightning_metakd.deploy.classifier import (
    FixedClassifier,
    MatchingClassifier,
    PrototypeClassifier,
)
from lightning_metakd.deploy.export import (
    export_classifier,
    preprocessing_from_datamodule,
    verify_export,
)
from lightning_metakd.deploy.exported_learner import (
    EnrolledState,
    ExportedLearner,
    load_exported_learner,
)
from lightning_metakd.deploy.finetune import (
    FinetuneEpoch,
    FinetuneError,
    LabelledImages,
    finetune,
    holdout_split,
    load_learner,
    read_class_folders,
    run_finetune,
)
from lightning_metakd.deploy.learner_export import ExportError, export_learner
from lightning_metakd.deploy.predict import ExportedClassifier, classify, load_exported
from lightning_metakd.deploy.quantize import quantize_learner

__all__ = [
    "EnrolledState",
    "ExportError",
    "ExportedLearner",
    "export_learner",
    "load_exported_learner",
    "quantize_learner",
    "ExportedClassifier",
    "classify",
    "export_classifier",
    "load_exported",
    "preprocessing_from_datamodule",
    "verify_export",
    "FinetuneEpoch",
    "FinetuneError",
    "FixedClassifier",
    "LabelledImages",
    "MatchingClassifier",
    "PrototypeClassifier",
    "finetune",
    "holdout_split",
    "load_learner",
    "read_class_folders",
    "run_finetune",
]
