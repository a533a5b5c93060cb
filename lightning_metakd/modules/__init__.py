"""LightningModules: wiring of data, models, algorithms and losses; logging."""

from lightning_metakd.modules.allocator import tune_cpu_allocator
from lightning_metakd.modules.distillation import (
    DistillationLoss,
    DistillationModule,
    TeacherEnsemble,
)
from lightning_metakd.modules.finite import NonFiniteLossError
from lightning_metakd.modules.meta_learner import MetaLearnerModule, MetaLoss

__all__ = [
    "DistillationLoss",
    "DistillationModule",
    "MetaLearnerModule",
    "MetaLoss",
    "NonFiniteLossError",
    "TeacherEnsemble",
    "tune_cpu_allocator",
]
