"""Episodic data: episodes, the episode sampler, and one DataModule per data source.

The names load on first use (:mod:`lightning_metakd.lazy_exports`): the renderers
(``kanji_render``, ``kanji_handwriting``, ``kanji_simple``) need only NumPy and Pillow, so the
processes that render the KanjiVG cache start without importing torch and Lightning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning_metakd.lazy_exports import lazy_exports

#: ``{public name: the module that defines it}``.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        ("Compose", "ElasticDistortion", "RandomAffine", "RandomLowResolution"),
        "lightning_metakd.data.augment",
    ),
    "ClassDataset": "lightning_metakd.data.dataset",
    "Episode": "lightning_metakd.data.episode",
    "EpisodeLoader": "lightning_metakd.data.loader",
    "EpisodeSampler": "lightning_metakd.data.sampler",
    "EpisodicDataModule": "lightning_metakd.data.datamodule",
    "FolderDataModule": "lightning_metakd.data.folder",
    "HandwritingDataModule": "lightning_metakd.data.handwriting",
    "KanjiDataModule": "lightning_metakd.data.kanji",
    "Learn2LearnDataModule": "lightning_metakd.data.learn2learn",  # imports learn2learn lazily
    "MiniImageNetDataModule": "lightning_metakd.data.miniimagenet",
    "NumpyOnlyUnpickler": "lightning_metakd.data.miniimagenet",
    "OmniglotDataModule": "lightning_metakd.data.omniglot",
    "TaskSpec": "lightning_metakd.data.episode",
}

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ loads them
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
    from lightning_metakd.data.learn2learn import Learn2LearnDataModule
    from lightning_metakd.data.loader import EpisodeLoader
    from lightning_metakd.data.miniimagenet import MiniImageNetDataModule, NumpyOnlyUnpickler
    from lightning_metakd.data.omniglot import OmniglotDataModule
    from lightning_metakd.data.sampler import EpisodeSampler

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ClassDataset",
    "Compose",
    "ElasticDistortion",
    "Episode",
    "EpisodeLoader",
    "EpisodeSampler",
    "EpisodicDataModule",
    "FolderDataModule",
    "HandwritingDataModule",
    "KanjiDataModule",
    "Learn2LearnDataModule",
    "MiniImageNetDataModule",
    "NumpyOnlyUnpickler",
    "OmniglotDataModule",
    "RandomAffine",
    "RandomLowResolution",
    "TaskSpec",
]
