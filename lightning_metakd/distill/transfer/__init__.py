"""θ* transfer: initialise a narrower student from the teacher by structured channel slicing.

A student of the same family but smaller width (``Conv4(hidden=16)`` for a ``Conv4(hidden=64)``
teacher, ``ResNet12(width=0.5)`` for ``ResNet12()``, a ViT with fewer heads and blocks) starts
from the teacher's meta-learned θ* restricted to the teacher's most important units
(:func:`slice_state`). Which units are most important is a rule
(:mod:`~lightning_metakd.distill.transfer.selection`): the ``|γ|`` of the BatchNorm after each
conv by default, the filter L1 norm, a random choice, or a data-driven score (mean activation,
first-order Taylor importance on meta-training episodes). The sliced state is both the
student's initialisation and the anchor θ* of MAML-anchored distillation
(:class:`~lightning_metakd.distill.ParameterAnchor`).

Layout: ``selection.py`` (the rules and the description of a set of units they score),
``structure.py`` (what each backbone family exposes: its sets of units and where their indices
go), ``slicing.py`` (:func:`slice_state`).
"""

from lightning_metakd.distill.transfer.selection import (
    BatchNormScale,
    ChannelSelection,
    ChannelSet,
    L1Norm,
    MeanActivation,
    RandomChannels,
    TaylorImportance,
    resolve_selection,
)
from lightning_metakd.distill.transfer.slicing import slice_state

__all__ = [
    "BatchNormScale",
    "ChannelSelection",
    "ChannelSet",
    "L1Norm",
    "MeanActivation",
    "RandomChannels",
    "TaylorImportance",
    "resolve_selection",
    "slice_state",
]
