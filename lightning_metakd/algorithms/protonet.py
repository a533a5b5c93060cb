"""Prototypical Networks (Snell et al. 2017)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_metakd.algorithms.base import MetaAlgorithm
from lightning_metakd.algorithms.inner_loop import Params

DISTANCES = ("sqeuclidean", "cosine")


def class_means(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Mean embedding of each class: ``[S, D]`` and ``[S]`` labels -> ``[ways, D]``.

    Written as a one-hot matrix product (no in-place scatter), so it works under ``vmap``.
    """
    onehot = (labels.unsqueeze(-1) == torch.arange(ways, device=labels.device)).to(embeddings.dtype)
    counts = onehot.sum(0).clamp_min(1).unsqueeze(-1)
    return onehot.transpose(0, 1) @ embeddings / counts


def prototype_logits(queries: Tensor, prototypes: Tensor, distance: str = "sqeuclidean") -> Tensor:
    """Scores of query embeddings ``[B, D]`` against prototypes ``[ways, D]``: ``[B, ways]``.

    ``−‖f(x) − c_k‖²`` (Snell et al. 2017, eq. 2) or, with ``distance="cosine"``, the cosine
    similarity. Shared by :class:`ProtoNet` and the frozen classifier of ``lightning_metakd.deploy``.
    """
    if distance == "cosine":
        return nn.functional.cosine_similarity(
            queries.unsqueeze(1), prototypes.unsqueeze(0), dim=-1
        )
    return -(queries.unsqueeze(1) - prototypes.unsqueeze(0)).pow(2).sum(-1)


class ProtoNet(MetaAlgorithm):
    """Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017).

    Each class is represented by its prototype, the mean embedding of its support samples,
    c_k = 1/|S_k| Σ_{x_i ∈ S_k} f(x_i) (eq. 1), and a query is classified by a softmax over negative
    distances, p(y = k | x) ∝ exp(−d(f(x), c_k)) (eq. 2). :meth:`logits` returns −d, shape
    ``[N*Q, ways]``; the squared Euclidean distance is the paper's choice.

    The model is the bare backbone (``needs_head = False``, anything that maps images to
    ``[B, D]`` embeddings). There is no inner loop. Support and query images are embedded in
    separate forward passes, so a batch-statistics BatchNorm normalises each set on its own (the
    library's transductive policy, see :func:`~lightning_metakd.algorithms.prepare_model`).

    Args:
        distance: ``"sqeuclidean"`` (−‖f(x) − c_k‖², the paper) or ``"cosine"`` (cosine
            similarity to the prototypes).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Flatten()
        >>> support_x = torch.tensor([[0.0, 0.0], [2.0, 0.0]]); support_y = torch.tensor([0, 1])
        >>> ProtoNet().task_logits(net, {}, support_x, support_y, torch.tensor([[1.0, 1.0]]),
        ...                        ways=2, training=False)
        tensor([[-2., -2.]])
    """

    needs_head = False

    def __init__(self, distance: str = "sqeuclidean") -> None:
        super().__init__(inner_steps=0)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
        self.distance = distance

    def adapt(
        self,
        model: nn.Module,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        ways: int,
        training: bool,
    ) -> Tensor:
        """The prototypes ``[ways, D]``."""
        embeddings = functional_call(model, params, (support_x,)).flatten(1)
        return class_means(embeddings, support_y, ways)

    def logits(
        self, model: nn.Module, params: Params, state: Tensor, query_x: Tensor, ways: int
    ) -> Tensor:
        """Negative distances of the query embeddings to the prototypes: ``[N*Q, ways]``."""
        queries = functional_call(model, params, (query_x,)).flatten(1)
        return prototype_logits(queries, state, self.distance)

    def fold(self, model: nn.Module, state: Tensor) -> PrototypeClassifier:
        """``model`` followed by the prototypes of ``state`` as a layer (:class:`PrototypeClassifier`)."""
        folded = PrototypeClassifier(copy.deepcopy(model), *state.shape, self.distance)
        with torch.no_grad():
            folded.prototypes.copy_(state)
        return folded

    def extra_repr(self) -> str:
        return f"distance={self.distance!r}"


class PrototypeClassifier(nn.Module):
    """``backbone`` followed by a prototype layer: a ProtoNet adapted to one task, frozen.

    Logits are ``−‖f(x) − c_k‖²`` (Snell et al. 2017, eq. 2) or, with ``distance="cosine"``, the
    cosine similarity to each prototype, exactly as :meth:`ProtoNet.logits
    <lightning_metakd.algorithms.ProtoNet.logits>` scores queries. The prototypes are a parameter,
    so further fine-tuning can move them like a linear head.

    Shapes: images ``[B, C, H, W]`` → logits ``[B, ways]``; ``prototypes`` is ``[ways, num_features]``.

    Example:
        >>> import torch
        >>> net = PrototypeClassifier(torch.nn.Flatten(), ways=2, num_features=2)
        >>> with torch.no_grad():
        ...     _ = net.prototypes.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
        >>> net(torch.tensor([[1.0, 1.0]])).tolist()
        [[-2.0, -2.0]]
    """

    def __init__(
        self, backbone: nn.Module, ways: int, num_features: int, distance: str = "sqeuclidean"
    ) -> None:
        super().__init__()
        if distance not in ("sqeuclidean", "cosine"):
            raise ValueError(f"distance must be 'sqeuclidean' or 'cosine', got {distance!r}.")
        self.backbone, self.ways, self.num_features, self.distance = (
            backbone,
            ways,
            num_features,
            distance,
        )
        self.prototypes = nn.Parameter(torch.zeros(ways, num_features))

    def forward(self, x: Tensor) -> Tensor:
        return prototype_logits(self.backbone(x).flatten(1), self.prototypes, self.distance)


__all__ = ["PrototypeClassifier", "ProtoNet", "class_means", "prototype_logits"]
