"""Episodic data: episodes, the episode sampler, and one DataModule per data source."""

from lightning_metakd.data.augment import (
    Compose,
    ElasticDistortion,
    RandomAffine,
    RandomLowResolution,
)
from lightning_metakd.data.datamodule import EpisodicDataModule
from lightning_metakd.data.dataset import ClassDataset
from lightning_metakd.data.episode import Episode, TaskSpec
from lightning_metakd.data.folder import FolderDataModule
from lightning_metakd.data.handwriting import HandwritingDataModule
from lightning_metakd.data.kanji import KanjiDataModule
from lightning_metakd.data.learn2learn import Learn2LearnDataModule  # imports learn2learn lazily
from lightning_metakd.data.loader import EpisodeLoader
from lightning_metakd.data.miniimagenet import MiniImageNetDataModule, NumpyOnlyUnpickler
from lightning_metakd.data.omniglot import OmniglotDataModule
from lightning_metakd.data.sampler import EpisodeSampler

__all__ = [
    "ClassDataset",
    "Episode",
    "EpisodeLoader",
    "EpisodeSampler",
    "EpisodicDataModule",
    "TaskSpec",
]
__all__ += [
    "FolderDataModule",
    "HandwritingDataModule",
    "KanjiDataModule",
    "MiniImageNetDataModule",
    "NumpyOnlyUnpickler",
    "OmniglotDataModule",
]
__all__ += ["Learn2LearnDataModule"]
__all__ += ["Compose", "ElasticDistortion", "RandomAffine", "RandomLowResolution"]
