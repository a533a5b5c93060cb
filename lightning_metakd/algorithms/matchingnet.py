"""Matching Networks (Vinyals et al. 2016)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_metakd.algorithms.base import MetaAlgorithm
from lightning_metakd.algorithms.inner_loop import Params


def matching_logits(queries: Tensor, support: Tensor, onehot: Tensor, temperature: float) -> Tensor:
    """Log attention mass of each class: ``[B, ways]``.

    ``queries`` ``[B, D]`` and ``support`` ``[S, D]`` are L2-normalised embeddings, ``onehot``
    ``[S, ways]`` the support labels. With ``s_i`` the cosine similarity to support ``i`` divided by
    ``temperature``: ``logsumexp_{i: y_i = k} s_i − logsumexp_i s_i`` (Vinyals et al. 2016, eqs. 1-2).
    Shared by :class:`MatchingNet` and the frozen classifier of ``lightning_metakd.deploy``.
    """
    scores = queries @ support.transpose(0, 1) / temperature  # [B, S]
    masked = scores.unsqueeze(-1).masked_fill(~onehot.unsqueeze(0), float("-inf"))
    return masked.logsumexp(1) - scores.logsumexp(1, keepdim=True)


class MatchingNet(MetaAlgorithm):
    """Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016).

    A query is labelled by attention over the support set, P(y | x, S) = Σ_i a(x, x_i) y_i (eq. 1),
    with a(x, x_i) = softmax_i(c(f(x), g(x_i)) / temperature) and c the cosine similarity (eq. 2).
    The probability of class k is the attention mass on its support samples; :meth:`logits` returns
    its logarithm, ``[N*Q, ways]``, computed stably as
    ``logsumexp_{i: y_i = k} s_i − logsumexp_i s_i``. These are normalised log-probabilities, so
    ``cross_entropy`` on them is the paper's negative log-likelihood.

    Simplifications: f = g is the backbone itself, without the paper's full-context embeddings
    (the bidirectional LSTM over the support set and the attention LSTM for queries), as in most
    reimplementations. The model is the bare backbone (``needs_head = False``).

    Args:
        temperature: divides the cosine similarities before the softmax; 1 is the paper. Cosine
            similarities lie in [−1, 1], so a smaller temperature sharpens the attention.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> support_x = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); support_y = torch.tensor([0, 1])
        >>> MatchingNet().task_logits(nn.Flatten(), {}, support_x, support_y,
        ...     torch.tensor([[1.0, 0.0]]), ways=2, training=False).exp()
        tensor([[0.7311, 0.2689]])
    """

    needs_head = False

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__(inner_steps=0)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.temperature = temperature

    def adapt(
        self,
        model: nn.Module,
        params: Params,
        support_x: Tensor,
        support_y: Tensor,
        ways: int,
        training: bool,
    ) -> tuple[Tensor, Tensor]:
        """The L2-normalised support embeddings ``[N*K, D]`` and one-hot labels ``[N*K, ways]``."""
        embeddings = functional_call(model, params, (support_x,)).flatten(1)
        onehot = support_y.unsqueeze(-1) == torch.arange(ways, device=support_y.device)
        return nn.functional.normalize(embeddings, dim=-1), onehot

    def logits(
        self,
        model: nn.Module,
        params: Params,
        state: tuple[Tensor, Tensor],
        query_x: Tensor,
        ways: int,
    ) -> Tensor:
        """Log attention mass per class: ``[N*Q, ways]``."""
        support, onehot = state
        queries = nn.functional.normalize(
            functional_call(model, params, (query_x,)).flatten(1), dim=-1
        )
        return matching_logits(queries, support, onehot, self.temperature)

    def fold(self, model: nn.Module, state: tuple[Tensor, Tensor]) -> MatchingClassifier:
        """``model`` followed by attention over the support set of ``state`` (:class:`MatchingClassifier`)."""
        support, onehot = state
        folded = MatchingClassifier(
            copy.deepcopy(model),
            onehot.shape[-1],
            len(support),
            support.shape[-1],
            self.temperature,
        )
        with torch.no_grad():
            folded.support.copy_(support)
            folded.support_labels.copy_(onehot.long().argmax(-1))
        return folded

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class MatchingClassifier(nn.Module):
    """``backbone`` followed by attention over a stored support set: a MatchingNet, frozen.

    Logits are the log attention mass of each class, ``logsumexp_{i: y_i = k} s_i −
    logsumexp_i s_i`` with ``s_i`` the cosine similarity of the query to support embedding ``i``
    divided by ``temperature`` (Vinyals et al. 2016, eqs. 1-2), as :meth:`MatchingNet.logits
    <lightning_metakd.algorithms.MatchingNet.logits>` computes them.

    Shapes: images ``[B, C, H, W]`` → logits ``[B, ways]``; ``support`` is
    ``[support_size, num_features]`` (normalised in ``forward``), ``support_labels`` ``[support_size]``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int,
        support_size: int,
        num_features: int,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.backbone, self.ways, self.support_size = backbone, ways, support_size
        self.num_features, self.temperature = num_features, temperature
        self.support = nn.Parameter(torch.zeros(support_size, num_features))
        self.register_buffer("support_labels", torch.zeros(support_size, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        queries = nn.functional.normalize(self.backbone(x).flatten(1), dim=-1)
        support = nn.functional.normalize(self.support, dim=-1)
        onehot = self.support_labels.unsqueeze(-1) == torch.arange(
            self.ways, device=self.support_labels.device
        )
        return matching_logits(queries, support, onehot, self.temperature)


__all__ = ["MatchingClassifier", "MatchingNet", "matching_logits"]
