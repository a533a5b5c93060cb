"""A DataLoader of episodes that resumes a killed run exactly where it stopped, even mid-epoch."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader


def random_states() -> dict[str, Any]:
    """The global random states of this process: torch (CPU, and the current CUDA device once CUDA
    is initialised), NumPy and Python's ``random``.

    Stored as tensors, lists and numbers only, so that a checkpoint holding them still loads with
    ``torch.load(weights_only=True)`` (torch's default, which Lightning's resume keeps).
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached_gaussian)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_random_states(states: Mapping[str, Any]) -> None:
    """Put back the states of :func:`random_states` (a ``cuda`` entry only where CUDA is available)."""
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state(
        (kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian)
    )
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class EpisodeLoader(DataLoader):
    """A ``DataLoader`` whose training position Lightning saves in every checkpoint and restores.

    Lightning 2.6 keeps a mid-epoch checkpoint's loop counters (``k`` of ``n`` batches done) but,
    for a plain ``DataLoader``, starts the resumed epoch at its first batch again, so the resumed run
    trains on batches ``0 .. n-k-1`` instead of ``k .. n-1`` and ends with other parameters. A loader
    with ``state_dict``/``load_state_dict`` is saved with the fit loop (``loops.fit_loop.state_dict.
    combined_loader`` in the checkpoint) and, on a mid-epoch resume, given back its state before the
    epoch is iterated (``FitLoop.setup_data``); this one then starts after the ``k`` batches:

    - state: the sampler's epoch and how many batches of it were handed out (Lightning fetches no
      batch ahead from a loader with a length, so that is how many were trained on);
    - resuming: the next iteration over the same epoch asks the sampler to skip ``k`` batches of
      tasks (:meth:`~lightning_metakd.data.EpisodeSampler.skip_next`: no image of them is loaded),
      or, for a sampler without ``skip_next``, loads and drops ``k`` batches. ``len`` stays ``n``:
      Lightning counts the ``k`` as done. A state from another epoch (a checkpoint taken after the
      last batch) skips nothing.

    :meth:`resume_random_states` puts the process's random states (dropout, random train
    transforms) back right before the first batch that is trained on, after the skip.

    Exact for ``num_workers=0``. Worker processes get fresh random streams when the resumed run
    starts them, so a random train transform running in workers draws differently after a resume.

    Example::

        loader = EpisodeLoader(dataset, sampler=sampler, batch_size=4, collate_fn=Episode.from_tasks)
        state = loader.state_dict()  # {"epoch": 0, "batches": 0}
    """

    # Class attributes, not __init__ arguments: Lightning re-creates DataLoader subclasses from
    # their __init__ arguments (e.g. for `predict`), which must stay those of DataLoader.
    _epoch: int = 0
    _batches: int = 0
    _resume: dict[str, int] | None = None
    _random_states: Mapping[str, Any] | None = None

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": e, "batches": k}``: ``k`` batches of epoch ``e`` handed out so far."""
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Make the next iteration over epoch ``state_dict["epoch"]`` start after its first ``k``."""
        missing = {"epoch", "batches"} - set(state_dict)
        if missing:
            raise KeyError(
                f"An EpisodeLoader state needs 'epoch' and 'batches'; {sorted(missing)} missing from "
                f"{dict(state_dict)!r}. Resume from a checkpoint written by this version."
            )
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"])}

    def resume_random_states(self, states: Mapping[str, Any]) -> None:
        """Set the process's random states to ``states`` (:func:`random_states`) right before the
        first batch of the next iteration is loaded."""
        self._random_states = states

    def __iter__(self) -> Iterator[Any]:
        # A generator: its body runs at the first next(), after Lightning's set_epoch of this epoch.
        return self._episodes()

    def _episodes(self) -> Iterator[Any]:
        epoch = int(getattr(self.sampler, "epoch", 0))
        resume, self._resume = self._resume, None
        states, self._random_states = self._random_states, None
        skip = 0
        if resume is not None and resume["epoch"] == epoch:
            skip = min(resume["batches"], len(self))
        sampler_skips = skip > 0 and hasattr(self.sampler, "skip_next")
        if sampler_skips:
            self.sampler.skip_next(skip * (self.batch_size or 1))
        batches = super().__iter__()
        if skip and not sampler_skips:
            for _ in range(skip):
                next(batches)
        if states is not None:
            set_random_states(states)
        self._epoch, self._batches = epoch, skip
        for batch in batches:
            self._batches += 1
            yield batch


__all__ = ["EpisodeLoader", "random_states", "set_random_states"]
