"""Distillation building blocks: losses, taps by module path, and θ* transfer to a narrower student.

The two objectives at the heart of meta-knowledge distillation:

- **MAML-anchored distillation**: ``L = L_task(θ − α∇θ L'_task(θ)) + λ‖θ − θ*‖²``, the student's
  post-adaptation query loss (MAML's inner step on the support loss ``L'_task``) plus a pull of
  its meta-parameters θ towards the teacher's meta-learned θ*
  (:func:`maml_anchored_distillation_loss`, :class:`ParameterAnchor`; θ* for a narrower student
  comes from :func:`slice_state`).
- **Attention distillation**: ``L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²``, the task loss plus
  the distance between the student's (target) attention maps and the meta-trained teacher's
  (:func:`attention_map_loss`, :class:`AttentionDistillation`).

Classical terms to combine with them: soft labels (:func:`soft_label_loss`, Hinton et al. 2015;
of several teachers via :func:`ensemble_probabilities`),
FitNets feature hints with a learned projector (:func:`feature_loss`,
:class:`FeatureDistillation`) and activation-based attention transfer
(:func:`attention_transfer_loss`, Zagoruyko & Komodakis 2017). Intermediate outputs come from
:func:`tapped_call` (forward hooks by module path, safe under ``torch.func.vmap``).

Every loss is a pure function (called per task, in a loop or under ``vmap``) plus a thin
``nn.Module`` that holds its weight and other hyper-parameters.

Example:
    >>> import torch
    >>> from lightning_metakd.models import Conv4
    >>> from lightning_metakd.models.classifier import Classifier
    >>> teacher, student = Classifier(Conv4(hidden=64), 5), Classifier(Conv4(hidden=16), 5)
    >>> theta_star = slice_state(teacher, student)
    >>> _ = student.load_state_dict(theta_star)
    >>> anchor = ParameterAnchor(theta_star, weight=0.01)
    >>> anchor(dict(student.named_parameters())).item()
    0.0
"""

from lightning_metakd.distill.losses import (
    AttentionDistillation,
    AttentionTransfer,
    FeatureDistillation,
    ParameterAnchor,
    SoftLabelDistillation,
    attention_map_loss,
    attention_transfer_loss,
    default_layer_map,
    ensemble_probabilities,
    ensemble_weights,
    feature_loss,
    maml_anchored_distillation_loss,
    parameter_anchor_loss,
    soft_label_loss,
    spatial_attention,
)
from lightning_metakd.distill.taps import default_tap, module_paths, tapped_call
from lightning_metakd.distill.transfer import slice_state

__all__ = [
    "AttentionDistillation",
    "AttentionTransfer",
    "FeatureDistillation",
    "ParameterAnchor",
    "SoftLabelDistillation",
    "attention_map_loss",
    "attention_transfer_loss",
    "default_layer_map",
    "default_tap",
    "ensemble_probabilities",
    "ensemble_weights",
    "feature_loss",
    "maml_anchored_distillation_loss",
    "module_paths",
    "parameter_anchor_loss",
    "slice_state",
    "soft_label_loss",
    "spatial_attention",
    "tapped_call",
]
