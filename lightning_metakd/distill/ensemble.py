"""Several teachers as one: ensemble weights, tempered ensemble probabilities, TeacherEnsemble."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_metakd.algorithms import EpisodeLoss, Learner
from lightning_metakd.algorithms.learner import scored
from lightning_metakd.data import Episode
from lightning_metakd.distill.term import check_positive


def ensemble_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """The weights of ``count`` teachers, checked and normalised to sum to 1 (``None``: uniform).

    Example:
        >>> ensemble_weights([3, 1], 2), ensemble_weights(None, 4)
        ([0.75, 0.25], [0.25, 0.25, 0.25, 0.25])
    """
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"an ensemble needs at least one teacher, got count={count!r}.")
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"teacher_weights must be a list of numbers, one per teacher, got {weights!r}."
        )
    values = list(weights)
    if len(values) != count:
        raise ValueError(
            f"teacher_weights has {len(values)} entries for {count} teachers; give one weight per "
            "teacher, in the order of the teachers (or leave teacher_weights out for equal weights)."
        )
    bad = [
        w
        for w in values
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) or w < 0
    ]
    if bad:
        raise ValueError(
            f"teacher_weights must be non-negative finite numbers, got {values!r}; a weight of 0 "
            "leaves a teacher out."
        )
    total = math.fsum(values)
    if total <= 0:
        raise ValueError(
            f"teacher_weights are all 0 ({values!r}); give at least one teacher a positive weight."
        )
    return [w / total for w in values]


def teacher_temperatures(temperature: float | Sequence[float], count: int) -> list[float]:
    """One softmax temperature per teacher: ``temperature`` repeated, or the list checked.

    Example:
        >>> teacher_temperatures(4, 2), teacher_temperatures([1, 8], 2)
        ([4.0, 4.0], [1.0, 8.0])
    """
    if isinstance(temperature, int | float) and not isinstance(temperature, bool):
        return [check_positive(temperature, "temperature", "temperature=4")] * count
    values = list(temperature)
    if len(values) != count:
        raise ValueError(
            f"the teacher temperatures list has {len(values)} entries for {count} teacher(s); "
            "give one temperature per teacher, in the order of the teachers, or a single number "
            "for all of them."
        )
    return [check_positive(t, "teacher temperature", "[1.0, 4.0]") for t in values]


def ensemble_probabilities(
    teacher_logits: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    temperature: float | Sequence[float] = 1.0,
) -> Tensor:
    """``Σ_k w_k · softmax(z_k / T_k)``: the tempered class probabilities of a teacher ensemble.

    Averaging probabilities (not logits) is the ensemble of Hinton et al. (2015), §1, and keeps
    each teacher's scale: a MAML head and a ProtoNet's negative distances need not agree on the
    size of their logits. Pass the result as ``teacher_probs`` of :func:`soft_label_loss` with the
    same ``T``. ``temperature`` is one ``T`` for every teacher or one ``T_k`` per teacher (for
    teachers whose logits live on different scales, e.g. ProtoNet's negative squared distances and
    a MAML head's logits). ``weights`` are checked and normalised by :func:`ensemble_weights` (``None``:
    the plain mean). Uses only tensor operations, so it runs per task under ``vmap``.

    Shapes: every ``teacher_logits[k]`` ``[..., C]`` (the same shape). Returns ``[..., C]``, rows
    summing to 1.

    Example:
        >>> import torch
        >>> a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -1e9]])
        >>> ensemble_probabilities([a, b]).tolist()
        [[0.75, 0.25]]
    """
    if isinstance(teacher_logits, Tensor) or not teacher_logits:
        raise TypeError("teacher_logits must be a non-empty list of tensors, one per teacher.")
    shapes = {tuple(z.shape) for z in teacher_logits}
    if len(shapes) != 1:
        raise ValueError(
            f"the teachers' logits differ in shape: {sorted(shapes)}; every teacher must predict "
            "the same queries and classes (the same ways)."
        )
    w = ensemble_weights(weights, len(teacher_logits))
    temperatures = teacher_temperatures(temperature, len(teacher_logits))
    probs = [F.softmax(z / t, dim=-1) for z, t in zip(teacher_logits, temperatures, strict=True)]
    total = w[0] * probs[0]
    for weight, p in zip(w[1:], probs[1:], strict=True):
        total = total + weight * p
    return total


def _log(probs: Tensor) -> Tensor:
    return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))


class TeacherEnsemble(nn.Module):
    """Several learners as one: each adapts on the same support set, their probabilities average.

    The prediction for a query is ``Σ_k w_k · softmax(z_k)`` (the ensemble of Hinton et al. 2015,
    :func:`ensemble_probabilities` at ``T = 1``), so teachers of different algorithms and
    backbones (a MAML Conv4 and a ProtoNet ResNet12) combine whatever the scale of their logits.
    It is what a ``DistillationModule`` with several teachers distils (at its temperature), and a
    row of the comparison report (:func:`lightning_metakd.report.compare` measures it like a
    :class:`~lightning_metakd.algorithms.Learner`). It is not trained.

    Args:
        learners: the learners, in order.
        weights: one non-negative weight per learner, normalised to sum to 1 (``None``: equal).

    Example::

        ensemble = TeacherEnsemble([maml_teacher, protonet_teacher])
        accuracy = ensemble.evaluate(episode).accuracy        # [T], like Learner.evaluate
        states = ensemble.adapt(support_x, support_y)         # one state per learner
        predicted = ensemble.predict(states, query_x).argmax(-1)
    """

    def __init__(self, learners: Sequence[Learner], weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if not learners or not all(isinstance(m, Learner) for m in learners):
            raise TypeError("TeacherEnsemble takes a non-empty list of Learners.")
        self.learners = nn.ModuleList(learners)
        self.weights = ensemble_weights(weights, len(learners))

    @property
    def models(self) -> list[nn.Module]:
        """The adapted network of every learner (``learner.model``)."""
        return [learner.model for learner in self.learners]

    def adapt(
        self, support_x: Tensor, support_y: Tensor, normalization: str | None = None
    ) -> list[Any]:
        """Every learner adapts to the support set ``[N*K, C, H, W]``, ``[N*K]``; their states
        (``normalization`` as for :meth:`Learner.adapt <lightning_metakd.algorithms.Learner.adapt>`)."""
        return [learner.adapt(support_x, support_y, normalization) for learner in self.learners]

    def predict(self, states: Sequence[Any], query_x: Tensor) -> Tensor:
        """Log-probabilities ``[M, N]`` of the ensemble for query images ``[M, C, H, W]``."""
        logits = [m.predict(s, query_x) for m, s in zip(self.learners, states, strict=True)]
        return _log(ensemble_probabilities(logits, self.weights))

    def evaluate(self, batch: Episode) -> EpisodeLoss:
        """Every learner's :meth:`~lightning_metakd.algorithms.Learner.evaluate`, combined: the
        ensemble's mean query negative log-likelihood, per-task accuracy ``[T]`` and
        log-probabilities ``[T, N*Q, N]``."""
        logits = [learner.evaluate(batch).logits for learner in self.learners]
        log_probs = _log(ensemble_probabilities([scored(z) for z in logits], self.weights))
        loss = F.nll_loss(log_probs.flatten(0, 1), batch.query_y.flatten())
        accuracy = (log_probs.argmax(-1) == batch.query_y).float().mean(1)
        return EpisodeLoss(loss, accuracy, log_probs)


__all__ = [
    "TeacherEnsemble",
    "ensemble_probabilities",
    "ensemble_weights",
    "teacher_temperatures",
]
