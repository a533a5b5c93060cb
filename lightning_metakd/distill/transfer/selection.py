"""Channel selection: how :func:`~lightning_metakd.distill.transfer.slice_state` ranks the units
(conv channels, attention heads, MLP units) of a teacher to decide which ones a narrower student
keeps.

A backbone describes each set of units that is sliced together as a :class:`ChannelSet`: which
weights compute a unit (its *filters*), which normalisation scale multiplies it (its *gates*),
which parameters its output is linear in (its *writers*) and where its output can be read
(its *taps*). A rule (:class:`ChannelSelection`) turns that description into one score per unit;
the student keeps the highest-scoring ones.

Rules, by name:

- ``"l1"`` — :class:`L1Norm`: L1 norm of each unit's filters (Li et al. 2017, §3.1). Kept for
  comparison: after a BatchNorm that normalises with batch statistics (all our conv backbones,
  ``track_running_stats=False``) scaling a filter does not change the network's output, so its
  norm carries no information about its importance.
- ``"bn_gamma"`` — :class:`BatchNormScale`: ``|γ|`` of the normalisation layer after the unit
  (Liu et al. 2017, "Learning Efficient Convolutional Networks through Network Slimming", §3.2):
  after normalisation the channel's spread *is* ``|γ|``.
- ``"random"`` — :class:`RandomChannels`: a seeded random choice, the control.
- ``"activation"`` — :class:`MeanActivation` (needs images): the mean magnitude of each unit's
  output on the images (the "mean activation" criterion of Molchanov et al. 2017, "Pruning
  Convolutional Neural Networks for Resource Efficient Inference", §2.2).
- ``"taylor"`` — :class:`TaylorImportance` (needs episodes and the teacher's algorithm): the
  first-order Taylor estimate of the episode loss's change when the unit is removed
  (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning", Eq. 8 with the
  BatchNorm gate of §3.2; Molchanov et al. 2017).

The two data-driven rules are objects holding their data (``slice_state(t, s,
TaylorImportance(episodes, ProtoNet()))``); the data-free ones may be named by string.

Measured with no training after slicing (``benchmarks/theta_star.py``; Conv4 ProtoNet teachers,
600 within-radical KanjiVG 5-way 1-shot episodes, points over random channels, paired):
``bn_gamma`` +18.2 / +9.7 / +14.0 / +5.7 for Conv4-32 → 8 / 32 → 16 / 64 → 16 / 64 → 32;
``taylor`` (20 training episodes) +0.7 / +4.5 / +5.1 / +6.1; ``l1`` −1.2 / +4.5 / −1.9 / −0.9;
``activation`` +0.3 / −7.3 / −0.7 / −9.1.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_metakd.data import Episode
from lightning_metakd.distill.taps import tap
from lightning_metakd.models.classifier import Classifier

if TYPE_CHECKING:
    from lightning_metakd.algorithms import MetaAlgorithm


@dataclass(frozen=True)
class Axis:
    """Axis ``dim`` of the tensor ``name``, laid out as ``parts × units × group`` entries.

    Unit ``u`` owns entries ``p·units·group + u·group + j`` for every part ``p`` and ``j <
    group``. A conv's filters are ``Axis("features.0.0.weight")``; the q/k/v rows of attention
    heads are ``Axis("blocks.0.attention.qkv.weight", 0, group=head_dim, parts=3)``; the columns of
    a head reading a ``[C, h, w]`` map flattened channel-major are
    ``Axis("head.weight", 1, group=h * w)``.
    """

    name: str
    dim: int = 0
    group: int = 1
    parts: int = 1

    def units(self, value: Tensor, count: int) -> Tensor:
        """``value`` rearranged to ``[count, n]``: row ``u`` holds every entry unit ``u`` owns."""
        moved = value.movedim(self.dim, 0)
        if moved.shape[0] != self.parts * count * self.group:
            raise ValueError(
                f"{self.name} has {moved.shape[0]} entries along dim {self.dim}, expected "
                f"{self.parts} x {count} units x {self.group}."
            )
        return moved.reshape(self.parts, count, self.group, -1).transpose(0, 1).reshape(count, -1)

    def indices(self, keep: Tensor, count: int) -> Tensor:
        """Entries of this axis owned by the units ``keep`` (ascending), in the tensor's order."""
        parts = torch.arange(self.parts)[:, None, None] * (count * self.group)
        entries = keep[None, :, None] * self.group + torch.arange(self.group)[None, None, :]
        return (parts + entries).flatten()


@dataclass(frozen=True)
class Tap:
    """Where a unit's output is read: the output (or, with ``input=True``, the first input) of the
    submodule ``path``, units along ``dim`` in groups of ``group`` entries."""

    path: str
    dim: int
    group: int = 1
    input: bool = False


@dataclass(frozen=True)
class ChannelSet:
    """Units of the teacher sliced together: the student keeps ``keep`` of the ``size``.

    Attributes:
        name: the layer, for messages (``"features.0.0"``, ``"blocks.1.attention"``).
        size, keep: the teacher's and the student's number of units.
        filters: weights that compute each unit (the ``"l1"`` rule sums their magnitudes).
        gates: normalisation scales ``γ`` applied to each unit (``"bn_gamma"``); empty when the
            unit has none of its own (ViT heads and MLP units), and then ``"l1"`` ranks it.
        writers: parameters each unit's output is linear and positively homogeneous in, so that
            ``Σ w · ∂L/∂w`` over the unit's entries is ``∂L/∂m`` for a mask ``m`` on the unit
            (``"taylor"``): BatchNorm/LayerNorm ``γ`` and ``β``, the output projection's columns.
        taps: where each unit's output is read (``"activation"``).
    """

    name: str
    size: int
    keep: int
    filters: tuple[Axis, ...]
    gates: tuple[Axis, ...]
    writers: tuple[Axis, ...]
    taps: tuple[Tap, ...]


class ChannelSelection:
    """A rule that scores every unit of every :class:`ChannelSet`; higher is kept first."""

    name: str = ""

    def scores(self, teacher: nn.Module, sets: Sequence[ChannelSet]) -> list[Tensor]:
        """One score vector ``[set.size]`` per set, in order. ``teacher`` owns the names."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _magnitude(teacher: nn.Module, axes: Sequence[Axis], size: int) -> Tensor:
    state = teacher.state_dict()
    return sum(axis.units(state[axis.name].detach().abs(), size).sum(1) for axis in axes)


class L1Norm(ChannelSelection):
    """``Σ |w|`` over each unit's filters (Li et al. 2017, "Pruning Filters for Efficient
    ConvNets", §3.1). Meaningless before a batch-statistics BatchNorm; kept for comparison."""

    name = "l1"

    def scores(self, teacher: nn.Module, sets: Sequence[ChannelSet]) -> list[Tensor]:
        return [_magnitude(teacher, s.filters, s.size) for s in sets]


class BatchNormScale(ChannelSelection):
    """``|γ|`` of the normalisation after each unit (Liu et al. 2017, Network Slimming, §3.2).

    With batch statistics a conv channel leaves BatchNorm as ``γ·x̂ + β`` with ``x̂`` of zero mean
    and unit variance, so ``|γ|`` is exactly its spread, whatever the filter's scale. Where several
    normalisations write the same channel (a ResNet-12 block's third conv and shortcut, which are
    added) their ``|γ|`` are summed: the sum bounds the spread of ``γ₁x̂₁ + γ₂x̂₂`` for any
    correlation of the two, and mirrors ranking the two filters jointly under ``"l1"``. For a ViT
    embedding channel the ``|γ|`` of every LayerNorm that reads the residual stream are summed.
    Units with no normalisation of their own (ViT heads, MLP units) fall back to :class:`L1Norm`.
    """

    name = "bn_gamma"

    def scores(self, teacher: nn.Module, sets: Sequence[ChannelSet]) -> list[Tensor]:
        return [_magnitude(teacher, s.gates or s.filters, s.size) for s in sets]


class RandomChannels(ChannelSelection):
    """Uniformly random units (seeded): the control every other rule must beat.

    Args:
        seed: seeds a generator that scores the sets in order, so a seed always picks the same
            channels for the same teacher and student architectures.
    """

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def scores(self, teacher: nn.Module, sets: Sequence[ChannelSet]) -> list[Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        return [torch.rand(s.size, generator=generator, dtype=torch.float64) for s in sets]

    def __repr__(self) -> str:
        return f"RandomChannels(seed={self.seed})"


def _as_batches(images: Tensor | Iterable[Tensor]) -> list[Tensor]:
    batches = [images] if isinstance(images, Tensor) else list(images)
    if not batches or any(not isinstance(b, Tensor) or b.dim() != 4 for b in batches):
        raise ValueError(
            "MeanActivation needs images: one tensor [B, C, H, W] or a non-empty list of them "
            "(each one forward batch, e.g. the support and the query sets of training tasks)."
        )
    return batches


class MeanActivation(ChannelSelection):
    """Mean ``|a|`` of each unit's output on ``images`` (after BatchNorm and the non-linearity).

    The data-driven counterpart of :class:`BatchNormScale`: a channel whose normalised output the
    ReLU mostly cuts (large ``|γ|`` but very negative ``β``) scores low. Each tensor of
    ``images`` is one forward pass of the teacher (batch statistics are those of that batch: pass
    the support and query sets of meta-training tasks separately, as a ProtoNet embeds them);
    scores are averaged over all passes, positions and a unit's entries (a head's dimensions) and
    summed over a unit's taps (every LayerNorm output for a ViT embedding channel).

    Args:
        images: ``[B, C, H, W]`` or an iterable of such batches, from the *training* split.

    Example:
        >>> import torch
        >>> from lightning_metakd.models import Conv4
        >>> from lightning_metakd.distill.transfer import slice_state
        >>> rule = MeanActivation(torch.rand(20, 1, 28, 28))
        >>> slice_state(Conv4(hidden=8), Conv4(hidden=4), rule)["features.0.0.weight"].shape
        torch.Size([4, 1, 3, 3])
    """

    name = "activation"

    def __init__(self, images: Tensor | Iterable[Tensor]) -> None:
        self.batches = _as_batches(images)

    def scores(self, teacher: nn.Module, sets: Sequence[ChannelSet]) -> list[Tensor]:
        outputs = sorted({p.path for s in sets for p in s.taps if not p.input})
        inputs = sorted({p.path for s in sets for p in s.taps if p.input})
        seen: dict[tuple[str, bool], list[Tensor]] = {}
        with torch.no_grad():
            for batch in self.batches:
                with tap(teacher, outputs) as out, tap(teacher, inputs, inputs=True) as into:
                    teacher(batch)
                for key, value in [*((k, False) for k in out), *((k, True) for k in into)]:
                    found = into[key] if value else out[key]
                    seen.setdefault((key, value), []).append(found.detach())
        scores = []
        for s in sets:
            total = torch.zeros(s.size, dtype=torch.float64)
            for point in s.taps:
                axis = Axis(point.path, point.dim, point.group)
                per_pass = [
                    axis.units(a.abs().double(), s.size).mean(1)
                    for a in seen[point.path, point.input]
                ]
                total = total + torch.stack(per_pass).mean(0)
            scores.append(total)
        return scores

    def __repr__(self) -> str:
        return f"MeanActivation({len(self.batches)} batches)"


class TaylorImportance(ChannelSelection):
    """First-order Taylor importance of each unit for the teacher's meta-training loss.

    Removing unit ``u`` is multiplying its output by a mask ``m_u = 0``; to first order the loss
    changes by ``∂L/∂m_u`` at ``m_u = 1``, which equals ``Σ w · ∂L/∂w`` over the parameters the
    unit's output is linear in (its BatchNorm or LayerNorm ``γ`` and ``β``, or its columns of the
    attention or MLP output projection). The importance is its square averaged over episodes,
    ``I_u = mean_e (Σ_{w ∈ u} w · ∂L_e/∂w)²`` (Molchanov et al. 2019, Eq. 8, with the BatchNorm
    gate of their §3.2; Molchanov et al. 2017 for the activation form). A ResNet-12 block's
    output channel is masked in both of the BatchNorms that write it, so their terms are summed
    inside the square; a ViT embedding channel likewise in every LayerNorm output.

    ``L_e`` is the query cross-entropy of ``algorithm`` on episode ``e`` after adaptation on its
    support sets (the ProtoNet loss of Snell et al. 2017 for a ProtoNet teacher; the MAML
    meta-loss, second order, for a MAML teacher wrapped in ``Classifier``), computed on detached
    copies of the teacher's parameters: the teacher is not changed and needs no gradients.

    Args:
        episodes: meta-training episodes (at least one).
        algorithm: the :class:`~lightning_metakd.algorithms.MetaAlgorithm` the teacher was
            meta-trained with, e.g. ``ProtoNet()``.

    Example:
        >>> import torch
        >>> from lightning_metakd.algorithms import ProtoNet
        >>> from lightning_metakd.data import Episode
        >>> from lightning_metakd.models import Conv4
        >>> from lightning_metakd.distill.transfer import slice_state
        >>> y = torch.arange(3).repeat(2, 1)
        >>> episode = Episode(torch.rand(2, 3, 1, 28, 28), y, torch.rand(2, 3, 1, 28, 28), y, y)
        >>> rule = TaylorImportance([episode], ProtoNet())
        >>> slice_state(Conv4(hidden=8), Conv4(hidden=4), rule)["features.3.1.weight"].shape
        torch.Size([4])
    """

    name = "taylor"

    def __init__(self, episodes: Iterable[Episode], algorithm: MetaAlgorithm) -> None:
        self.episodes = list(episodes)
        if not self.episodes or not all(isinstance(e, Episode) for e in self.episodes):
            raise ValueError(
                "TaylorImportance needs a non-empty list of Episode objects, e.g. the first "
                "batches of a data module's train_dataloader()."
            )
        if not hasattr(algorithm, "episode_logits"):
            raise ValueError(
                f"algorithm must be the MetaAlgorithm the teacher was trained with (e.g. "
                f"ProtoNet()), got {type(algorithm).__name__}."
            )
        self.algorithm = algorithm

    def scores(self, teacher: nn.Module, sets: Sequence[ChannelSet]) -> list[Tensor]:
        wrapped = isinstance(teacher, Classifier)
        if self.algorithm.needs_head != wrapped:
            raise ValueError(
                f"{type(self.algorithm).__name__} "
                f"{'needs a Classifier' if self.algorithm.needs_head else 'runs a bare backbone'}"
                f" but the teacher is a {type(teacher).__name__}; pass the algorithm the teacher "
                "was meta-trained with."
            )
        params = {n: p.detach().clone().requires_grad_(True) for n, p in teacher.named_parameters()}
        names = sorted({axis.name for s in sets for axis in s.writers})
        totals = [torch.zeros(s.size, dtype=torch.float64) for s in sets]
        for episode in self.episodes:
            with torch.enable_grad():
                logits = self.algorithm.episode_logits(
                    teacher, params, episode.support_x, episode.support_y, episode.query_x,
                    episode.ways, training=True, vmap_tasks=False,
                )  # fmt: skip
                loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            contribution = {
                n: (params[n].detach() * g if g is not None else torch.zeros_like(params[n]))
                for n, g in zip(names, grads, strict=True)
            }
            for total, s in zip(totals, sets, strict=True):
                change = sum(
                    a.units(contribution[a.name].double(), s.size).sum(1) for a in s.writers
                )
                total += change.pow(2)
        return [total / len(self.episodes) for total in totals]

    def __repr__(self) -> str:
        return f"TaylorImportance({len(self.episodes)} episodes, {type(self.algorithm).__name__})"


#: Rules that need no data, by name (``"random"`` is seed 0).
RULES: dict[str, type[ChannelSelection]] = {
    "l1": L1Norm,
    "bn_gamma": BatchNormScale,
    "random": RandomChannels,
}
#: Rules that need data: they are passed as objects, not by name.
DATA_RULES: dict[str, str] = {
    "activation": "MeanActivation(images)",
    "taylor": "TaylorImportance(episodes, algorithm)",
}


def resolve_selection(selection: str | ChannelSelection) -> ChannelSelection:
    """The rule object for ``selection``: a :class:`ChannelSelection` or the name of a data-free
    rule. Names of data-driven rules and unknown names raise a ``ValueError`` naming the fix."""
    if isinstance(selection, ChannelSelection):
        return selection
    if selection in RULES:
        return RULES[selection]()
    if selection in DATA_RULES:
        raise ValueError(
            f"selection={selection!r} needs data: pass selection={DATA_RULES[selection]} "
            "(from lightning_metakd.distill.transfer)."
        )
    raise ValueError(
        f"unknown selection {selection!r}; use one of {sorted(RULES)} or a rule object "
        f"({', '.join(DATA_RULES.values())})."
    )


__all__ = [
    "Axis",
    "BatchNormScale",
    "ChannelSelection",
    "ChannelSet",
    "L1Norm",
    "MeanActivation",
    "RandomChannels",
    "Tap",
    "TaylorImportance",
    "resolve_selection",
]
