"""lightning-metakd: meta-knowledge distillation for PyTorch Lightning.

Meta-train a teacher on few-shot tasks (:class:`MetaLearnerModule`), then distil its
meta-knowledge into a smaller student that still adapts. Public API only; the pieces live in
``data/``, ``models/``, ``algorithms/``, ``distill/`` and ``modules/`` (docs/architecture.md).

The names load on first use (PEP 562 module ``__getattr__``, :mod:`~lightning_metakd.lazy_exports`): ``import lightning_metakd`` and
``metakd <command> --help`` do not import torch (about 2 s) or Lightning (about 5 s more), while
``from lightning_metakd import MAML`` works as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_metakd.lazy_exports import lazy_exports

__version__ = "0.1.0"

#: ``{public name: the module that defines it}``.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ("ANIL", "MAML", "Learner", "MatchingNet", "MetaAlgorithm", "MetaSGD", "ProtoNet"),
        "lightning_metakd.algorithms",
    ),
    **dict.fromkeys(
        (
            "ClassDataset",
            "Episode",
            "EpisodeSampler",
            "EpisodicDataModule",
            "FolderDataModule",
            "KanjiDataModule",
            "Learn2LearnDataModule",
            "MiniImageNetDataModule",
            "OmniglotDataModule",
            "TaskSpec",
        ),
        "lightning_metakd.data",
    ),
    **dict.fromkeys(("Conv4", "ResNet12", "VisionTransformer"), "lightning_metakd.models"),
    **dict.fromkeys(
        ("DistillationModule", "MetaLearnerModule", "NonFiniteLossError", "load_learner"),
        "lightning_metakd.modules",
    ),
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads them
    from lightning_metakd.algorithms import (
        ANIL,
        MAML,
        Learner,
        MatchingNet,
        MetaAlgorithm,
        MetaSGD,
        ProtoNet,
    )
    from lightning_metakd.data import (
        ClassDataset,
        Episode,
        EpisodeSampler,
        EpisodicDataModule,
        FolderDataModule,
        KanjiDataModule,
        Learn2LearnDataModule,
        MiniImageNetDataModule,
        OmniglotDataModule,
        TaskSpec,
    )
    from lightning_metakd.models import Conv4, ResNet12, VisionTransformer
    from lightning_metakd.modules import (
        DistillationModule,
        MetaLearnerModule,
        NonFiniteLossError,
        load_learner,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "ANIL",
    "MAML",
    "ClassDataset",
    "Conv4",
    "DistillationModule",
    "Episode",
    "EpisodeSampler",
    "EpisodicDataModule",
    "FolderDataModule",
    "KanjiDataModule",
    "Learn2LearnDataModule",
    "Learner",
    "MatchingNet",
    "MetaAlgorithm",
    "MetaLearnerModule",
    "MetaSGD",
    "MiniImageNetDataModule",
    "NonFiniteLossError",
    "OmniglotDataModule",
    "ProtoNet",
    "ResNet12",
    "TaskSpec",
    "VisionTransformer",
    "__version__",
    "load_learner",
]
