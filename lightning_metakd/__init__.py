"""lightning-metakd: meta-knowledge distillation for PyTorch Lightning."""

from lightning_metakd.data import ClassDataset, Episode, EpisodeSampler, EpisodicDataModule, TaskSpec

__version__ = "0.1.0"

__all__ = ["ClassDataset", "Episode", "EpisodeSampler", "EpisodicDataModule", "TaskSpec", "__version__"]
