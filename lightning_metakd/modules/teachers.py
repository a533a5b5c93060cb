"""The frozen teachers of a :class:`~lightning_metakd.modules.DistillationModule`.

What the module does with its teachers, apart from wiring them to a Trainer: read one from
whatever it was given (:func:`load_teacher`), derive the student's θ* from the anchor teacher
(:func:`theta_star`), estimate population statistics for those that need them
(:func:`calibrate_teachers`) and run every teacher on one task without gradients
(:func:`teachers_on_task`): adapted states, query logits in float32 and the taps the terms read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_metakd.algorithms import Learner, Params
from lightning_metakd.distill import DistillationTerm, slice_state, tap
from lightning_metakd.distill.term import teacher_name
from lightning_metakd.distill.transfer import ChannelSelection
from lightning_metakd.modules.checkpoint import checkpoint_file, read_checkpoint
from lightning_metakd.modules.episodic import EpisodicModule

#: What a teacher may be given as (a ``pathlib.Path`` works too; the annotation keeps ``str`` so
#: that LightningCLI parses a YAML list of paths as a list).
TeacherSource = str | Learner | EpisodicModule


def load_teacher(source: TeacherSource | Path) -> Learner:
    """The :class:`~lightning_metakd.algorithms.Learner` of a teacher given as a learner, a
    trained module, a checkpoint path or ``pretrained:<name>``; a missing file says how to get one."""
    if isinstance(source, Learner):
        return source
    if isinstance(source, EpisodicModule):
        return source.learner
    path = checkpoint_file(
        source,
        what="teacher checkpoint",
        advice="train the teacher first (e.g. `metakd fit --config "
        "configs/kanji/protonet.yaml`), pass model.teacher=<checkpoint>, or a shipped one: "
        "model.teacher=pretrained:kanji-protonet-conv4-64.",
    )
    return read_checkpoint(path).learner()


def theta_star(
    teacher: Learner,
    student: nn.Module,
    selection: ChannelSelection,
    init_from_teacher: bool,
    anchor_teacher: int = 0,
    num_teachers: int = 1,
) -> dict[str, Tensor] | None:
    """θ* for ``student`` (a backbone-and-head model) from ``teacher``; loaded into it with
    ``init_from_teacher``.

    The teacher's state as is when the architectures are equal, else (only with
    ``init_from_teacher``) sliced to the student's widths by ``selection``
    (:func:`~lightning_metakd.distill.slice_state`). ``None`` when the state does not fit.
    """
    t_state, s_state = teacher.model.state_dict(), student.state_dict()
    same = set(t_state) == set(s_state) and all(
        t_state[k].shape == v.shape for k, v in s_state.items()
    )
    if same:
        state = {k: v.detach().clone() for k, v in t_state.items()}
    elif not init_from_teacher:
        return None
    else:
        try:
            state = slice_state(teacher.model, student, selection)
        except ValueError as err:
            if num_teachers == 1:
                raise
            k = anchor_teacher
            raise ValueError(
                f"θ* comes from teacher {k} (anchor_teacher={k}), a "
                f"{type(teacher.algorithm).__name__} {type(teacher.backbone).__name__}, which "
                f"does not fit the student: {err} Set anchor_teacher to a teacher of the "
                "student's family, or turn init_from_teacher off."
            ) from None
    if init_from_teacher:
        student.load_state_dict(state)
    return state


def calibrate_teachers(teachers: Sequence[Learner], data: Any, device: torch.device) -> None:
    """Estimate population statistics, from ``data``'s calibration images, for every teacher that
    normalises with them and has none yet."""
    for k, teacher in enumerate(teachers):
        if teacher.normalization != "population" or bool(getattr(teacher, "calibrated", False)):
            continue
        if data is None or not hasattr(data, "calibration_images"):
            raise ValueError(
                f"the {teacher_name(k, len(teachers))} normalises with population statistics but "
                "has none and this run has no EpisodicDataModule to estimate them from; pass one, "
                "or calibrate the teacher first (learner.calibrate(images))."
            )
        teacher.calibrate(x.to(device) for x in data.calibration_images())


def teachers_on_task(
    teachers: Sequence[Learner],
    params: Sequence[Params],
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    ways: int,
    paths: Callable[[int], list[str]],
    bf16: bool = False,
    lookups: Sequence[nn.Module | None] = (),
    support_index: Tensor | None = None,
    query_index: Tensor | None = None,
) -> tuple[list[Any], list[Tensor], list[dict[str, Tensor]]]:
    """Adapt every teacher on ONE task and predict its queries, without gradients.

    Returns each teacher's adapted state, its query logits and the outputs of the layers
    ``paths(k)`` names (both in float32, also under ``bf16`` autocast). A teacher with a lookup
    (``distill/cache.py``) reads its cached per-image embeddings by sample index instead.
    """
    states, logits, taps = [], [], []
    with torch.no_grad(), torch.autocast(support_x.device.type, torch.bfloat16, bf16):
        for k, (teacher, p) in enumerate(zip(teachers, params, strict=True)):
            algorithm, model = teacher.algorithm, teacher.model
            lookup = lookups[k] if lookups else None
            if lookup is not None:
                state = algorithm.adapt(lookup, {}, support_index, support_y, ways, False)
                logits.append(algorithm.logits(lookup, {}, state, query_index, ways))
                states.append(state)
                taps.append({})
                continue
            task = algorithm.adapt_task(
                model, p, support_x, support_y, ways, False, teacher.policy()
            )
            with tap(model, paths(k)) as tapped:
                logits.append(algorithm.predict_task(model, p, task, query_x, ways))
            states.append(task.state)
            taps.append({path: _float(v) for path, v in tapped.items()})
    return states, [_float(z) for z in logits], taps


def check_terms(terms: list[Any]) -> None:
    """Raise a clear error for a term list a DistillationModule cannot train with."""
    wrong = [type(t).__name__ for t in terms if not isinstance(t, DistillationTerm)]
    if wrong:
        raise TypeError(
            f"terms must be DistillationTerm objects (TaskLoss, SoftLabels, FeatureHints, ...), got "
            f"{wrong}; in YAML each is `- class_path: lightning_metakd.distill.SoftLabels`."
        )
    names = [t.name for t in terms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"two terms are both named {repeated}; give one of them another name (init_args: "
            "{name: ...}) so each is logged as train/loss_<name> on its own."
        )
    if not any(t.weight for t in terms):
        raise ValueError(
            "every term's weight is 0 (or there is no term), so there is nothing to train; add "
            "TaskLoss(weight=1) and at least one distillation term, e.g. SoftLabels(weight=1)."
        )


def _float(value: Tensor) -> Tensor:
    """A teacher's output in float32 (bf16 autocast leaves some in bfloat16); others as they are."""
    return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
