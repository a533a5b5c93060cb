"""LightningModules: wiring of data, models, algorithms and losses; logging."""

from lightning_metakd.modules.meta_learner import MetaLearnerModule, MetaLoss

__all__ = ["MetaLearnerModule", "MetaLoss"]
