"""Check an exported learner against the learner it came from: the same logits on the same tasks.

:func:`verify_learner_export` runs the exported ``enrol`` + ``classify`` graphs (through
:func:`~lightning_metakd.deploy.exported_learner.load_exported_learner`) next to
``learner.adapt`` + ``learner.predict`` on each task and fails when they differ by more than
PyTorch's own float32 rounding allows; :func:`random_episodes` gives the seeded tasks that
:func:`~lightning_metakd.deploy.learner_export.export_learner` checks on by default.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from lightning_metakd.algorithms import Learner
from lightning_metakd.deploy.exported_learner import load_exported_learner
from lightning_metakd.deploy.learner_graphs import head_only


def example_images(count: int, channels: int, size: int, seed: int) -> Tensor:
    """``count`` seeded uniform images ``[count, channels, size, size]`` to trace and check on."""
    return torch.rand(count, channels, size, size, generator=torch.Generator().manual_seed(seed))


def random_episodes(
    learner: Learner, kind: str, channels: int, size: int
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Three seeded random tasks to verify on: 2, 2 and 3 shots; 3-5 ways for metric learners.

    At least six support images each: BatchNorm over two or three images divides by the variance
    of so few values that float32 rounding is amplified beyond any fixed tolerance.
    """
    episodes = []
    for i, shots in enumerate((2, 2, 3)):
        ways = learner.ways if kind == "head" else 3 + i
        support_y = torch.arange(ways).repeat(shots)
        episodes.append(
            (
                example_images(len(support_y), channels, size, 10 + i),
                support_y,
                example_images(3 + 4 * i, channels, size, 20 + i),
            )
        )
    return episodes


def verify_learner_export(
    learner: Learner,
    model_dir: str | Path,
    episodes: Iterable[tuple[Tensor, Tensor, Tensor]],
    formats: Iterable[str] = ("onnx", "torch_export"),
    *,
    frozen_body: bool = False,
    threads: int = 0,
    atol: float = 1e-4,
    rtol: float = 0.0,
) -> dict[str, dict[str, float]]:
    """Exported ``enrol`` + ``classify`` against ``learner.adapt`` + ``learner.predict``, per task.

    Both follow the policy in ``learner.json``; a ``frozen_body`` export is compared with the
    learner whose inner loop adapts only its head (:func:`~lightning_metakd.deploy.learner_graphs.head_only`). Returns ``{format:
    {"max_abs_diff": max |Δlogits| over all tasks, "argmax_agree": share of queries with the same
    argmax, "tasks": count}}``. Raises ``AssertionError`` when a task's difference exceeds
    ``atol + rtol · max |logits| + 4 · r``, where ``r`` is the float32 rounding of PyTorch itself
    on that task (its distance from the float64 learner): BatchNorm over a support set of a few
    images divides by a small variance, which can amplify rounding to ~1e-3 on logits near 100 in
    untrained networks; an export with other semantics is far outside that.
    """
    reference = head_only(learner) if frozen_body else learner
    exact = copy.deepcopy(reference).double()
    runners = {f: load_exported_learner(model_dir, f, threads=threads) for f in formats}
    policy = next(iter(runners.values())).normalization
    results = {f: {"max_abs_diff": 0.0, "argmax_agree": 0.0, "tasks": 0} for f in runners}
    agree = {f: 0 for f in runners}
    total = 0
    for support_x, support_y, query_x in episodes:
        expected = reference.predict(reference.adapt(support_x, support_y, policy), query_x)
        truth = exact.predict(exact.adapt(support_x.double(), support_y, policy), query_x.double())
        rounding = float((expected.double() - truth).abs().max())
        total += len(query_x)
        scale = float(expected.abs().max())
        for fmt, runner in runners.items():
            logits = runner.classify(runner.enrol(support_x, support_y), query_x)
            delta = float((logits - expected).abs().max())
            results[fmt]["max_abs_diff"] = max(results[fmt]["max_abs_diff"], delta)
            results[fmt]["tasks"] += 1
            agree[fmt] += int((logits.argmax(-1) == expected.argmax(-1)).sum())
            if not delta <= atol + rtol * scale + 4 * rounding:
                raise AssertionError(
                    f"the {fmt} enrol + classify graphs in {model_dir} differ from learner.adapt "
                    f"+ learner.predict by max |Δlogits| = {delta:.3g} > {atol:g} + {rtol:g} · "
                    f"{scale:.3g} + 4 · {rounding:.2g} (PyTorch's own float32 rounding) on a task "
                    f"of {len(support_x)} support images: the export is not faithful (an operator "
                    "exported with other semantics, or a learner that changed after export)."
                )
    for fmt in runners:
        results[fmt]["argmax_agree"] = agree[fmt] / max(total, 1)
    return results


__all__ = ["example_images", "random_episodes", "verify_learner_export"]
