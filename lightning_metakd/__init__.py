"""lightning-metakd: meta-knowledge distillation for PyTorch Lightning.

Meta-train a teacher on few-shot tasks (:class:`MetaLearnerModule`), then distil its
meta-knowledge into a smaller student that still adapts. Public API only; the pieces live in
``data/``, ``models/``, ``algorithms/``, ``distill/`` and ``modules/`` (docs/architecture.md).
"""

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

__version__ = "0.1.0"

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
