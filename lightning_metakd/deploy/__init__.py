"""Deployment: turn a meta-learned (or distilled) learner into a classifier for a user's classes.

- :class:`FixedClassifier`: a learner adapted once and frozen into a plain module, images →
  logits, saved and loaded without pickled code.
- :func:`finetune`: adapt on labelled images and optionally fine-tune further with the θ*-anchor;
  :func:`run_finetune` does the whole job on a folder of class folders (``metakd finetune``).
- :func:`export_classifier`: write it as ``torch.export`` and ONNX programs and check their outputs;
  :func:`load_exported` / :func:`classify` run the exported files (``metakd classify``).
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
from lightning_metakd.deploy.predict import ExportedClassifier, classify, load_exported

__all__ = [
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
