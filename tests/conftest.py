"""Shared fixtures (tiny episodic data built in memory, no files, no network), and a session check
that the suite leaves no new files behind in the repository, the working directory or the cache."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import leftovers
import pytest
import torch

from lightning_metakd.data import ClassDataset, Episode, EpisodicDataModule
from lightning_metakd.data.kanji import default_cache_dir


def make_class_dataset(
    num_classes: int = 10,
    per_class: int = 6,
    size: int = 8,
    prefix: str = "c",
    groups: int = 0,
    seed: int = 0,
) -> ClassDataset:
    """Random uint8 images: a per-class random template under heavy per-image noise.

    Classes are learnable but not trivially separable, so a few meta-training steps measurably
    raise few-shot accuracy.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    coarse = torch.rand(num_classes, 1, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="nearest")
    noise = torch.rand(len(labels), 1, size, size, generator=g)
    images = ((0.6 * templates[labels] + 0.4 * noise) * 255).round().to(torch.uint8)
    names = [f"{prefix}{i}" for i in range(num_classes)]
    group_map = (
        {f"{prefix}g{k}": list(range(k, num_classes, groups)) for k in range(groups)}
        if groups
        else None
    )
    return ClassDataset(images, labels, names, groups=group_map, image_size=size)


class TinyDataModule(EpisodicDataModule):
    """Three in-memory splits of random classes: the fixture DataModule of the test suite."""

    def __init__(
        self,
        classes: tuple[int, int, int] = (12, 8, 8),
        per_class: int = 6,
        groups: int = 0,
        **kwargs,
    ):
        kwargs.setdefault("image_size", 8)
        super().__init__(**kwargs)
        self.classes, self.per_class, self.num_groups = classes, per_class, groups

    def build_splits(self) -> dict[str, ClassDataset]:
        return {
            split: make_class_dataset(
                n, self.per_class, self.image_size, prefix=split, groups=self.num_groups, seed=i
            )
            for i, (split, n) in enumerate(zip(("train", "val", "test"), self.classes, strict=True))
        }


def make_terms(
    task: float = 1.0, soft_labels: float = 1.0, temperature: float = 4.0, **weights: float
) -> list:
    """Distillation terms by logged name and weight, in a fixed order (a weight of 0 leaves a term
    out): ``make_terms(soft_labels=0.7, feature_hints=0.3)`` is TaskLoss, SoftLabels, FeatureHints."""
    from lightning_metakd.distill import (
        AttentionDistillation,
        AttentionTransfer,
        FeatureHints,
        ParameterAnchor,
        SoftLabels,
        TaskLoss,
    )

    kinds = {
        "task": TaskLoss,
        "soft_labels": functools.partial(SoftLabels, temperature=temperature),
        "feature_hints": FeatureHints,
        "attention_transfer": AttentionTransfer,
        "attention": AttentionDistillation,
        "anchor": ParameterAnchor,
    }
    unknown = set(weights) - set(kinds)
    assert not unknown, f"no term named {unknown}"
    weights = {"task": task, "soft_labels": soft_labels, **weights}
    return [kinds[name](weight=weights[name]) for name in kinds if weights.get(name)]


TERM_NAMES = {"task", "soft_labels", "temperature", "feature_hints", "attention_transfer",
              "attention", "anchor"}  # fmt: skip


def make_distiller(teacher, backbone=None, algorithm=None, seed: int = 1, terms=None, **kwargs):
    """A DistillationModule of a Conv4-4 ProtoNet student (3-way, 16 px) by default.

    ``backbone`` may be a factory, built after seeding so ``seed`` sets the student's
    initialisation; keyword arguments named after terms (:data:`TERM_NAMES`) build ``terms`` with
    :func:`make_terms`, the others go to the module (Adam, lr 5e-3, unless given).
    """
    from lightning_metakd.algorithms import ProtoNet
    from lightning_metakd.models import Conv4
    from lightning_metakd.modules import DistillationModule

    torch.manual_seed(seed)
    if backbone is None:
        backbone = Conv4(hidden=4, image_size=16)
    elif not isinstance(backbone, torch.nn.Module):
        backbone = backbone()
    weights = {k: kwargs.pop(k) for k in list(kwargs) if k in TERM_NAMES}
    kwargs.setdefault("optimizer", functools.partial(torch.optim.Adam, lr=5e-3))
    terms = make_terms(**weights) if terms is None else terms
    return DistillationModule(teacher, backbone, algorithm or ProtoNet(), ways=3, terms=terms,
                              **kwargs)  # fmt: skip


def run_together(
    commands: Sequence[Sequence[str]], envs: Sequence[Mapping[str, str]], timeout: float
) -> list[subprocess.CompletedProcess]:
    """Start every command at once (command ``i`` with environment ``envs[i]``) and wait for all.

    For processes that only finish together (the nodes of one distributed run) or that must race
    (two renders into one cache). Each runs in a process group of its own and writes stdout and
    stderr into one temporary file: a pipe could fill up while the test waits on another process
    that waits on this one. After ``timeout`` seconds every group is killed — the processes and
    whatever they started (Lightning's extra ranks) — and the test fails with each one's output;
    groups are killed after a normal exit too, so no straggler outlives the test.
    """
    deadline = time.monotonic() + timeout
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in commands]
        procs = [
            subprocess.Popen(
                command, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            for command, env, log in zip(commands, envs, logs, strict=True)
        ]
        timed_out = False
        try:
            for proc in procs:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            for proc in procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read().decode(errors="replace"))
    if timed_out:
        tails = "\n".join(f"--- process {i}:\n{out[-2000:]}" for i, out in enumerate(outputs))
        raise AssertionError(f"Not all finished within {timeout} s; killed them all:\n{tails}")
    return [
        subprocess.CompletedProcess(proc.args, proc.returncode, stdout=out)
        for proc, out in zip(procs, outputs, strict=True)
    ]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models gain nothing from intra-op threads, and on a shared CPU they oversubscribe.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_datamodule() -> TinyDataModule:
    dm = TinyDataModule(
        ways=3,
        shots=2,
        queries=2,
        meta_batch_size=4,
        steps_per_epoch=3,
        val_episodes=6,
        test_episodes=10,
    )
    dm.setup()
    return dm


@pytest.fixture
def tiny_episode(tiny_datamodule: TinyDataModule) -> Episode:
    return next(iter(tiny_datamodule.train_dataloader()))


# -- the suite leaves nothing behind (tests/leftovers.py) -----------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    config.stash[leftovers.EXTRA_PLACES] = [
        default_cache_dir(),
        Path.home() / ".cache" / "lightning_metakd",
    ]
    if not config.pluginmanager.is_registered(leftovers):
        config.pluginmanager.register(leftovers, "leftovers")  # `-p no:leftovers` blocks it
