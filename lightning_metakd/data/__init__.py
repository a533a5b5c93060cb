"""Episodic data: episodes, the episode sampler, and one DataModule per data source."""

from lightning_metakd.data.datamodule import EpisodicDataModule
from lightning_metakd.data.dataset import ClassDataset
from lightning_metakd.data.episode import Episode, TaskSpec
from lightning_metakd.data.sampler import EpisodeSampler

__all__ = ["ClassDataset", "Episode", "EpisodeSampler", "EpisodicDataModule", "TaskSpec"]
