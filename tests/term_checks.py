"""Checks every distillation term's test runs (tests/test_terms_*.py): tiny episodes and teachers,
loop == vmap, and gradients that reach the student and never the teacher."""

from __future__ import annotations

from collections.abc import Callable

import torch
from conftest import TinyDataModule

from lightning_metakd.data import Episode
from lightning_metakd.models import Conv4
from lightning_metakd.modules import DistillationModule, MetaLearnerModule


def tiny_episode(ways: int = 3, shots: int = 2, queries: int = 2, tasks: int = 2) -> Episode:
    """One training episode of ``tasks`` tasks at 16 px."""
    dm = TinyDataModule(
        ways=ways, shots=shots, queries=queries, meta_batch_size=tasks, image_size=16
    )
    dm.setup()
    return next(iter(dm.train_dataloader()))


def teacher(algorithm, hidden: int = 8, ways: int = 3, seed: int = 0) -> MetaLearnerModule:
    """A Conv4 teacher (16 px) with ``algorithm``, seeded."""
    torch.manual_seed(seed)
    return MetaLearnerModule(Conv4(hidden=hidden, image_size=16), algorithm, ways=ways)


def assert_loop_equals_vmap(
    make: Callable[[], DistillationModule], episode: Episode, float64: bool = False
) -> None:
    """The same terms and gradients with the student's tasks in a loop and under vmap.

    ``float64``: compare in double precision to 1e-10 (for terms whose float32 rounding, e.g. the
    ``N³`` angles of RKD, is above the float32 tolerances).
    """
    results = {}
    tolerances = dict(rtol=1e-10, atol=1e-10) if float64 else dict(rtol=1e-4, atol=1e-5)
    for vmap_tasks in (False, True):
        model = make()
        model.student.vmap_tasks = vmap_tasks
        if float64:
            model = model.double()
        out = model.episode_loss(episode.to(dtype=torch.float64) if float64 else episode)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[vmap_tasks] = out, grads
    (loop, loop_grads), (vmapped, vmap_grads) = results[False], results[True]
    assert set(loop.terms) == set(vmapped.terms)
    for name in loop.terms:
        torch.testing.assert_close(vmapped.terms[name], loop.terms[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(loop_grads, vmap_grads, strict=True):
        torch.testing.assert_close(a, b, **tolerances)


def assert_gradients_reach_the_student_only(model: DistillationModule, episode: Episode) -> None:
    """The term alone (``model.terms`` holds only it) moves every student parameter, no teacher."""
    (term,) = model.terms
    out = model.episode_loss(episode)
    assert out.terms[term.name] > 0
    out.loss.backward()
    grads = {n: p.grad for n, p in model.student.model.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    for teacher in model.teachers:
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
