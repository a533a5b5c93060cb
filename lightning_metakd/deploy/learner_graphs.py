"""The ``enrol`` and ``classify`` graphs of an exported learner, and what decides them.

:func:`~lightning_metakd.deploy.learner_export.export_learner` traces these two modules:

- :class:`EnrolGraph`: ``support_images [S, C, H, W]`` and ``support_onehot [S, N]`` (the labels,
  one-hot) → the task state: ProtoNet's ``prototypes [N, D]``; MatchingNet's ``support_embeddings
  [S, D]`` and ``support_classes [S, N]`` (one-hot); the adapted ``head_weight [N, D]`` and
  ``head_bias [N]`` of a head-only gradient learner (ANIL; MAML and Meta-SGD with
  ``frozen_body=True``), its inner steps unrolled in the graph. Under the ``"support"``
  normalisation policy the state also holds ``statistics [2, ΣC]``: the mean (row 0) and biased
  variance (row 1) of every BatchNorm's input on the support set, layer after layer.
- :class:`ClassifyGraph`: ``query_images [M, C, H, W]`` and that state → ``logits [M, N]``. Every
  query is normalised with the state's statistics (``"support"``) or with population statistics
  folded into the graph (``"population"``), so a query's answer never depends on the other queries
  of its batch.

Which learners can be exported, and how (:func:`export_policy`, :func:`adaptation_kind`), and the
model's :func:`fingerprint` are decided here too, as are the names and files ``learner.json``
uses, which :mod:`lightning_metakd.deploy.exported_learner` reads.

Head-only adaptation is written in closed form: for logits ``z = W f + b`` of frozen features ``f``
the cross-entropy gradient is ``∂L/∂z_i = (softmax(z_i) − y_i) / S``, ``∇W = (∂L/∂z)ᵀ F`` and
``∇b = Σ_i ∂L/∂z_i``, so each of the ``inner_steps_test`` steps ``θ ← θ − α ∇θ L`` (Finn et al. 2017,
eq. 1, restricted to the head as in ANIL, Raghu et al. 2020) is a handful of matrix products any
runtime has (:func:`head_steps`). Full-network MAML cannot be exported to ONNX with torch 2.14:
``docs/deploy.md`` says why.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_metakd.algorithms import ANIL, MAML, Learner
from lightning_metakd.algorithms.normalization import (
    TRANSDUCTIVE,
    Statistics,
    batch_norm_statistics,
    freeze_batch_norm,
)
from lightning_metakd.models.classifier import Classifier

#: ``learner.json``: its ``format`` entry and layout version.
FORMAT = "lightning_metakd.ExportedLearner"
FORMAT_VERSION = 1
LEARNER_FILE = "learner.json"
#: The graph files of each format.
GRAPH_FILES = {
    "onnx": {"enrol": "enrol.onnx", "classify": "classify.onnx"},
    "torch_export": {"enrol": "enrol.pt2", "classify": "classify.pt2"},
}
#: The policies a graph can bake in: a transductive graph's answers would depend on the batch.
EXPORT_POLICIES = ("support", "population")
#: Names of the state tensors of the metric algorithms (others: ``state_0``, ``state_1``, ...).
STATE_NAMES = {
    "ProtoNet": ("prototypes",),
    "MatchingNet": ("support_embeddings", "support_classes"),
}
HEAD_STATE = ("head_weight", "head_bias")
SUPPORTED = (
    "ProtoNet, MatchingNet (any algorithm without a head and inner steps), ANIL, and MAML or "
    "Meta-SGD with frozen_body=True (--frozen_body)"
)


class ExportError(ValueError):
    """A learner, a setting or an input that the learner export cannot take; the message says why."""


# -- what is exported -------------------------------------------------------------------------------
def export_policy(learner: Learner, normalization: str | None = None) -> str:
    """The normalisation policy the graphs bake in: ``"support"`` or ``"population"``.

    ``None`` takes the learner's own, a transductive learner exporting with ``"support"`` (as
    :meth:`Learner.adapt <lightning_metakd.algorithms.Learner.adapt>` does on user data).
    """
    policy = normalization or learner.normalization
    if normalization is None and policy == "transductive":
        policy = "support"
    if policy not in EXPORT_POLICIES:
        raise ExportError(
            f"normalization={policy!r} cannot be exported: with transductive statistics a query's "
            "answer depends on the other queries of its batch; use 'support' (the support set's "
            "statistics, the default) or 'population'."
        )
    if policy == "population" and not bool(getattr(learner, "calibrated", False)):
        raise ExportError(
            "normalization='population' needs the learner's population statistics, which it has "
            "not estimated: call learner.calibrate(images) first, or give `metakd export "
            "--calibration CONFIG` (meta-training tasks), or export with 'support'."
        )
    return policy


def adaptation_kind(learner: Learner, frozen_body: bool = False) -> str:
    """``"metric"`` (no head, no inner steps) or ``"head"`` (a linear head's inner steps in the graph).

    Raises :class:`ExportError` for algorithms the graphs cannot adapt: MAML-family learners that
    adapt the body (unless ``frozen_body``), heads that are not one ``nn.Linear``, and others.
    """
    algorithm = learner.algorithm
    name = type(algorithm).__name__
    if not algorithm.needs_head:
        if algorithm.steps(False):
            raise ExportError(
                f"{name} takes {algorithm.steps(False)} inner steps without a head, which the "
                f"export cannot unroll; supported for in-graph adaptation: {SUPPORTED}."
            )
        return "metric"
    model = learner.model
    if not isinstance(algorithm, MAML) or not isinstance(model, Classifier):
        raise ExportError(
            f"{name} cannot be adapted inside an exported graph; supported for in-graph "
            f"adaptation: {SUPPORTED}. Export a fixed classifier instead (metakd finetune, then "
            "metakd export --classifier)."
        )
    head = {f"head.{n}" for n, _ in model.head.named_parameters()}
    if not isinstance(model.head, nn.Linear) or head != {"head.weight", "head.bias"}:
        raise ExportError(
            f"the head of this {name} learner is a {type(model.head).__name__}, not an nn.Linear "
            "with a bias; the exported inner steps are the closed-form gradient of a linear head."
        )
    adapted = algorithm.adapted_names(learner.params(detach=True))
    if adapted is not None and set(adapted) == head:
        return "head"
    if isinstance(algorithm, ANIL):
        raise ExportError(
            f"this ANIL adapts {sorted(adapted or [])[:3]}, not exactly the linear head; the "
            "exported inner steps adapt head.weight and head.bias only."
        )
    if not frozen_body:
        raise ExportError(
            f"{name} adapts every parameter, and full-network adaptation cannot be exported to "
            "ONNX (docs/deploy.md says why); export it with a frozen body (frozen_body=True, "
            "--frozen_body): the body stays θ* and the inner steps adapt the head, ANIL's update "
            "with this learner's θ* and step sizes."
        )
    return "head"


def head_only(learner: Learner) -> Learner:
    """A copy of a MAML-family ``learner`` whose inner loop adapts only ``head.*``: the reference
    of a ``frozen_body`` export (for ANIL, the same learner)."""
    frozen = copy.deepcopy(learner)
    names = ("head.weight", "head.bias")
    frozen.algorithm.adapted_names = lambda params: [n for n in params if n in names]
    return frozen


def fingerprint(learner: Learner, policy: str, kind: str) -> str:
    """A hash of everything that decides the exported graphs' numbers: the learner's tensors (its
    weights, meta-learned step sizes, population statistics), its components and the export's
    settings. A state enrolled by one model carries it, so another model refuses it."""
    digest = hashlib.sha256()
    settings = {"components": learner.components(), "policy": policy, "adaptation": kind}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(learner.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else b"bf16")
    return digest.hexdigest()[:16]


def _pack(statistics: Statistics, layers: Sequence[tuple[str, int]]) -> Tensor:
    """``{layer: (mean, var)}`` → ``[2, ΣC]``: means in row 0, variances in row 1, layer by layer."""
    return torch.cat([torch.stack(statistics[name]) for name, _ in layers], dim=1)


def _unpack(packed: Tensor, layers: Sequence[tuple[str, int]]) -> Statistics:
    """The inverse of :func:`_pack`."""
    parts = torch.split(packed, [channels for _, channels in layers], dim=1)
    return {name: (part[0], part[1]) for (name, _), part in zip(layers, parts, strict=True)}


def head_steps(
    features: Tensor,
    onehot: Tensor,
    weight: Tensor,
    bias: Tensor,
    step_sizes: tuple[Tensor | float, Tensor | float],
    steps: int,
) -> tuple[Tensor, Tensor]:
    """``steps`` gradient steps on the support cross-entropy of a linear head, in closed form.

    With logits ``z = F Wᵀ + b`` of the support features ``F [S, D]`` and labels ``Y [S, N]``
    (one-hot), ``L = mean_i CE(z_i, y_i)`` has ``∂L/∂z = (softmax(z) − Y) / S``, ``∇W = (∂L/∂z)ᵀ F``
    and ``∇b = Σ_i ∂L/∂z_i``; each step is ``W ← W − α_W ∇W``, ``b ← b − α_b ∇b`` (``α`` a float,
    or Meta-SGD's per-entry rates). The same numbers as :func:`~lightning_metakd.algorithms.
    inner_loop` restricted to the head, without autograd, so that any graph runtime can run it.
    """
    lr_weight, lr_bias = step_sizes
    for _ in range(steps):
        dz = (torch.softmax(F.linear(features, weight, bias), dim=-1) - onehot) / features.shape[0]
        weight = weight - lr_weight * (dz.transpose(0, 1) @ features)
        bias = bias - lr_bias * dz.sum(0)
    return weight, bias


class _Graph(nn.Module):
    """What the enrol and classify graphs share: the network to export and how it normalises."""

    def __init__(self, learner: Learner, policy: str, kind: str) -> None:
        super().__init__()
        model = copy.deepcopy(learner.model).eval().requires_grad_(False)
        if policy == "population":
            # Fixed statistics as BatchNorm running statistics: exported as plain BatchNorm, which
            # ONNX Runtime folds into the convolutions.
            freeze_batch_norm(model, learner.population_statistics())
        self.model, self.algorithm = model, copy.deepcopy(learner.algorithm).eval()
        self.policy, self.kind = policy, kind
        self.layers = [
            (n, m.num_features)
            for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.steps = learner.algorithm.steps(False)
        if kind == "head":
            sizes = learner.algorithm.step_sizes()
            self.step_sizes = tuple(
                sizes[n].detach() if isinstance(sizes, dict) else float(sizes)
                for n in ("head.weight", "head.bias")
            )
        self.state_spec: Any = None  # the metric algorithm's state pytree (set by export_learner)
        self.bool_leaves: list[bool] = []
        self.ways_at: tuple[int, int] = (0, 0)  # (leaf, axis) of the state that counts the ways
        self.eval()

    def params(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())

    def normalising(self, statistics: Statistics | None = None) -> Any:
        """Record (``None``) or impose the support statistics under ``"support"``; nothing else."""
        if self.policy != "support":
            return contextlib.nullcontext()
        return batch_norm_statistics(self.model, statistics)


class EnrolGraph(_Graph):
    """``(support_images [S, C, H, W], support_onehot [S, N])`` → the state tensors of a task."""

    def adapt(self, support_images: Tensor, support_onehot: Tensor) -> list[Tensor]:
        """The algorithm's state of one task as a list of tensors (no statistics)."""
        if self.kind == "head":
            features = self.model.forward_features(support_images).flatten(1)
            head = self.model.head
            weight, bias = head_steps(
                features, support_onehot, head.weight, head.bias, self.step_sizes, self.steps
            )
            return [weight, bias]
        labels, ways = support_onehot.argmax(1), support_onehot.shape[1]
        task = self.algorithm.adapt_task(
            self.model, self.params(), support_images, labels, ways, False, TRANSDUCTIVE
        )
        return [leaf.float() if leaf.dtype == torch.bool else leaf for leaf in self._leaves(task)]

    def _leaves(self, task: Any) -> list[Tensor]:
        leaves, spec = pytree.tree_flatten(task.state)
        if self.state_spec is None:
            self.state_spec, self.bool_leaves = spec, [t.dtype == torch.bool for t in leaves]
        return leaves

    def forward(self, support_images: Tensor, support_onehot: Tensor) -> tuple[Tensor, ...]:
        with self.normalising() as record:
            state = self.adapt(support_images, support_onehot)
        if self.policy == "support":
            state.append(_pack(record.recorded, self.layers))
        return tuple(state)


class ClassifyGraph(_Graph):
    """``(query_images [M, C, H, W], *state)`` → ``logits [M, N]``."""

    def forward(self, query_images: Tensor, *state: Tensor) -> Tensor:
        statistics = _unpack(state[-1], self.layers) if self.policy == "support" else None
        leaves = list(state[:-1] if self.policy == "support" else state)
        with self.normalising(statistics):
            if self.kind == "head":
                features = self.model.forward_features(query_images).flatten(1)
                return F.linear(features, leaves[0], leaves[1])
            leaves = [t > 0.5 if b else t for t, b in zip(leaves, self.bool_leaves, strict=True)]
            leaf, axis = self.ways_at
            ways = leaves[leaf].shape[axis]
            task_state = pytree.tree_unflatten(leaves, self.state_spec)
            return self.algorithm.logits(self.model, self.params(), task_state, query_images, ways)


__all__ = [
    "EXPORT_POLICIES",
    "FORMAT",
    "FORMAT_VERSION",
    "GRAPH_FILES",
    "HEAD_STATE",
    "LEARNER_FILE",
    "STATE_NAMES",
    "SUPPORTED",
    "ClassifyGraph",
    "EnrolGraph",
    "ExportError",
    "adaptation_kind",
    "export_policy",
    "fingerprint",
    "head_only",
    "head_steps",
]
