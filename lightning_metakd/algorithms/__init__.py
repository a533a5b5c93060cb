"""Adaptation: the one functional inner loop, the MAML family and metric-based methods.

Every algorithm is a :class:`MetaAlgorithm`: given a model, its parameters as a ``{name: tensor}``
dict and a meta-batch of tasks, :meth:`MetaAlgorithm.episode_logits` returns the query logits
``[T, N*Q, ways]``; the caller applies cross-entropy to them and calls ``backward`` (the
meta-gradient). Everything is written with :mod:`torch.func` (``functional_call``, ``grad``), so one
task function runs in a Python loop over tasks (the default on CPU) or under ``torch.func.vmap``
(the default on GPUs), with identical numbers.

- :class:`Learner`: a backbone, an algorithm and ``ways``: what adapts, predicts and evaluates
  (shared by the LightningModules, the report, fine-tuning and export).
- :func:`map_tasks`: the episode engine, a per-task function over an episode's tasks in a loop
  or under ``vmap``.
- :func:`inner_loop`: θ' = θ − α ∇θ L(support), shared by MAML, FOMAML, ANIL and Meta-SGD.
- :class:`MAML` (``first_order=True`` for FOMAML), :class:`ANIL`, :class:`MetaSGD`: the model is a
  ``Classifier(backbone, ways)``; ``needs_head = True``.
- :class:`ProtoNet`, :class:`MatchingNet`: the model is the bare backbone; ``needs_head = False``.

BatchNorm policy: BatchNorm uses the statistics of the batch it sees, in training and evaluation
alike (transductive, the convention of MAML's reference implementation); a task's support and query
sets are normalised each with their own statistics. The library's backbones are built with
``track_running_stats=False``. For a backbone of your own with running statistics, call
:func:`prepare_model` once: it switches those layers to batch statistics (via
``torch.func.replace_all_batch_norm_modules_``) and warns. Dropout works in both paths; under vmap
each task draws its own mask (``randomness="different"``).

Second order under vmap: in torch 2.14 the second derivatives of the fused BatchNorm/LayerNorm
kernels are wrong under ``torch.func.vmap`` (meta-gradients off by ~1%, float64); the vmap path
therefore computes these normalisations from elementary operations
(:func:`composite_normalization`), which restores the loop's numbers exactly.

Example:
    >>> import torch
    >>> from lightning_metakd.algorithms import MAML
    >>> from lightning_metakd.models import Conv4
    >>> from lightning_metakd.models.classifier import Classifier
    >>> model, algorithm = Classifier(Conv4(hidden=8), ways=5), MAML(inner_lr=0.4)
    >>> algorithm.build(model)
    >>> support_x, query_x = torch.randn(4, 5, 1, 28, 28), torch.randn(4, 15, 1, 28, 28)
    >>> support_y, query_y = torch.arange(5).expand(4, 5), torch.arange(5).repeat(3).expand(4, 15)
    >>> logits = algorithm.episode_logits(model, dict(model.named_parameters()), support_x,
    ...                                   support_y, query_x, ways=5, training=True)
    >>> loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), query_y.flatten())
    >>> loss.backward()  # the second-order meta-gradient
"""

from lightning_metakd.algorithms.anil import ANIL
from lightning_metakd.algorithms.base import MetaAlgorithm
from lightning_metakd.algorithms.engine import map_tasks, use_vmap
from lightning_metakd.algorithms.inner_loop import Params, inner_loop, inner_step
from lightning_metakd.algorithms.learner import EpisodeLoss, Learner
from lightning_metakd.algorithms.maml import MAML
from lightning_metakd.algorithms.matchingnet import MatchingClassifier, MatchingNet, matching_logits
from lightning_metakd.algorithms.meta_gradient import memory_bounded_loss
from lightning_metakd.algorithms.metasgd import MetaSGD
from lightning_metakd.algorithms.normalization import (
    POLICIES,
    Normalization,
    TaskState,
    batch_norm_statistics,
    composite_normalization,
    freeze_batch_norm,
    prepare_model,
)
from lightning_metakd.algorithms.protonet import (
    ProtoNet,
    PrototypeClassifier,
    class_means,
    prototype_logits,
)

__all__ = [
    "ANIL",
    "POLICIES",
    "Normalization",
    "TaskState",
    "batch_norm_statistics",
    "freeze_batch_norm",
    "MAML",
    "EpisodeLoss",
    "Learner",
    "MatchingClassifier",
    "MatchingNet",
    "MetaAlgorithm",
    "MetaSGD",
    "Params",
    "PrototypeClassifier",
    "ProtoNet",
    "class_means",
    "composite_normalization",
    "inner_loop",
    "inner_step",
    "map_tasks",
    "matching_logits",
    "memory_bounded_loss",
    "prepare_model",
    "prototype_logits",
    "use_vmap",
]
