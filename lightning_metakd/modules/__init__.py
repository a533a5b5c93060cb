"""LightningModules: wiring of learners, distillation terms and a Trainer; logging; checkpoints."""

from lightning_metakd.modules.allocator import tune_cpu_allocator
from lightning_metakd.modules.checkpoint import (
    Checkpoint,
    CheckpointError,
    MissingCheckpointError,
    checkpoint_file,
    load_learner,
    load_module,
    read_checkpoint,
)
from lightning_metakd.modules.distillation import DistillationModule
from lightning_metakd.modules.episodic import EpisodicModule
from lightning_metakd.modules.finite import NonFiniteLossError
from lightning_metakd.modules.meta_learner import MetaLearnerModule

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DistillationModule",
    "EpisodicModule",
    "MetaLearnerModule",
    "MissingCheckpointError",
    "NonFiniteLossError",
    "checkpoint_file",
    "load_learner",
    "load_module",
    "read_checkpoint",
    "tune_cpu_allocator",
]
