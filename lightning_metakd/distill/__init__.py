"""Distillation: the terms of the objective, the taps they read, teachers as an ensemble, θ* transfer.

The two objectives at the heart of meta-knowledge distillation, each a sum of terms:

- **MAML-anchored distillation**: ``L = L_task(θ − α∇θ L'_task(θ)) + λ‖θ − θ*‖²`` —
  :class:`TaskLoss` (the student's query loss after its inner step on the support loss
  ``L'_task``) plus :class:`ParameterAnchor` (a pull of its meta-parameters θ towards the teacher's
  meta-learned θ*; θ* for a narrower student comes from :func:`slice_state`).
- **Attention distillation**: ``L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²`` —
  :class:`TaskLoss` plus :class:`AttentionDistillation` (the student's attention maps against the
  meta-trained teacher's).

Classical terms to combine with them: :class:`SoftLabels` (Hinton et al. 2015; several teachers
through :func:`ensemble_probabilities`), :class:`FeatureHints` (FitNets, with learned projectors)
and :class:`AttentionTransfer` (Zagoruyko & Komodakis 2017). A term is one class in one file of
:mod:`lightning_metakd.distill.terms` (:class:`DistillationTerm` says what a term is); your own
is a subclass anywhere, named by ``class_path``. Intermediate outputs come from :func:`tap`
(forward hooks by module path, safe under ``torch.func.vmap``).

Example:
    >>> import torch
    >>> from lightning_metakd.models import Conv4
    >>> from lightning_metakd.models.classifier import Classifier
    >>> teacher, student = Classifier(Conv4(hidden=64), 5), Classifier(Conv4(hidden=16), 5)
    >>> theta_star = slice_state(teacher, student)
    >>> _ = student.load_state_dict(theta_star)
    >>> float(parameter_anchor_loss(dict(student.named_parameters()), theta_star))
    0.0
"""

from lightning_metakd.distill.ensemble import (
    TeacherEnsemble,
    ensemble_probabilities,
    ensemble_weights,
    teacher_temperatures,
)
from lightning_metakd.distill.taps import (
    default_layer_map,
    module_paths,
    tap,
    tap_points,
    tapped_call,
)
from lightning_metakd.distill.term import DistillationTerm, StepContext, TaskContext
from lightning_metakd.distill.terms import *  # noqa: F403 - every term and its loss function
from lightning_metakd.distill.terms import __all__ as _terms
from lightning_metakd.distill.transfer import slice_state

__all__ = [
    "DistillationTerm",
    "StepContext",
    "TaskContext",
    "TeacherEnsemble",
    "default_layer_map",
    "ensemble_probabilities",
    "ensemble_weights",
    "module_paths",
    "slice_state",
    "tap",
    "tap_points",
    "tapped_call",
    "teacher_temperatures",
    *_terms,
]
