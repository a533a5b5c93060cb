"""What a distillation term is: one weighted part of the objective, in one class.

``DistillationModule`` minimises ``Σ_i w_i · term_i`` over a list of terms. A term is a small
``nn.Module`` that knows everything about its part of the objective, in one place:

- what it needs — the student's and each teacher's tapped layers (:meth:`DistillationTerm.
  student_paths` / :meth:`~DistillationTerm.teacher_paths`), whether the teachers must run at all
  (``needs_teachers``);
- how it binds, once, when the teachers are known (:meth:`~DistillationTerm.bind`): choose and
  validate tap paths, size projectors, store θ* — so a bad combination fails at start-up;
- its value for one task (:meth:`~DistillationTerm.forward` on a :class:`TaskContext`), or once per
  step for a term of the parameters alone (``per_task = False``, e.g. the θ*-anchor);
- one ``weight`` and one ``name``: logged as ``train/loss_<name>`` (already weighted).

A term of your own is a subclass in your project, named in YAML by its ``class_path``::

    class CosineEmbedding(DistillationTerm):
        name = "cosine_embedding"
        def forward(self, ctx: TaskContext) -> Tensor:
            ...  # ctx.student_logits, ctx.teacher_logits, ctx.student_tap(path), ...

Terms run per task inside a Python loop or under :func:`torch.func.vmap`
(:func:`~lightning_metakd.algorithms.map_tasks`), so ``forward`` must be pure tensor code: no
data-dependent Python branches, no state written outside the returned value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_metakd.algorithms import Learner, Params
from lightning_metakd.distill.taps import tapped_call


def check_weight(value: Any, name: str = "weight") -> float:
    """A term weight: a finite number ≥ 0 (0 switches the term off)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0:
        raise ValueError(
            f"{name} must be a non-negative finite number (the term's weight λ), got "
            f"{name}={value!r}; {name}=0 switches the term off."
        )
    return float(value)


def check_positive(value: Any, name: str, example: str) -> float:
    """A finite number > 0 (a temperature, an exponent); the message shows ``example``."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise ValueError(
            f"{name} must be a positive finite number, got {name}={value!r}; e.g. {example}."
        )
    return float(value)


@dataclass
class TaskContext:
    """What one task of a distillation step offers its terms (all tensors of that one task).

    The student adapted on the support set with its algorithm (``student_state``) and scored the
    queries (``student_logits``, with its taps recorded on that query forward pass); each teacher
    did the same without gradients (``teacher_states``, ``teacher_logits``, ``teacher_taps``)
    when some term needs the teachers, else those lists are empty.
    """

    support_x: Tensor  #: ``[N*K, C, H, W]``
    support_y: Tensor  #: ``[N*K]``
    query_x: Tensor  #: ``[N*Q, C, H, W]``
    query_y: Tensor  #: ``[N*Q]``
    ways: int
    training: bool
    student: Learner
    student_params: Params  #: θ, the student's meta-parameters (before adaptation)
    student_state: Any  #: the adapted state (θ', prototypes, support embedding)
    student_logits: Tensor  #: ``[N*Q, N]``
    student_taps: Mapping[str, Tensor]
    teachers: Sequence[Learner]
    teacher_weights: Sequence[float]
    teacher_states: Sequence[Any] = ()
    teacher_logits: Sequence[Tensor] = ()
    teacher_taps: Sequence[Mapping[str, Tensor]] = ()

    def student_tap(self, path: str) -> Tensor:
        """The student's output at ``path`` on the query forward pass."""
        return self.student_taps[path]

    def teacher_tap(self, k: int, path: str) -> Tensor:
        """Teacher ``k``'s output at ``path`` on the query forward pass."""
        return self.teacher_taps[k][path]

    def mix(self, values: Sequence[Tensor]) -> Tensor:
        """``Σ_k w_k · values[k]`` over the teachers (one teacher: its value as is)."""
        if len(values) == 1:
            return values[0]
        total = self.teacher_weights[0] * values[0]
        for weight, value in zip(self.teacher_weights[1:], values[1:], strict=True):
            total = total + weight * value
        return total


@dataclass
class StepContext:
    """What a term of the parameters alone (``per_task = False``) sees, once per step."""

    student: Learner
    student_params: Params
    teachers: Sequence[Learner]


class DistillationTerm(nn.Module):
    """One weighted part of the distillation objective (see the module docstring).

    Subclasses set :attr:`name`, implement :meth:`forward`, and override :meth:`bind`,
    :meth:`student_paths` and :meth:`teacher_paths` when they need them. Constructor arguments must
    be stored under their own names (``self.weight = weight``) so a checkpoint can rebuild the term.

    Args:
        weight: λ ≥ 0, the factor of this term in the objective.
        name: the logged name (``train/loss_<name>``); default the class's :attr:`name`. Give two
            terms of the same class different names.
    """

    #: Default logged name (``train/loss_<name>``).
    name: str = "term"
    #: ``True``: a value per task, averaged over the tasks; ``False``: once per step (a function
    #: of the parameters alone, e.g. ‖θ − θ*‖²), from :meth:`forward` on a :class:`StepContext`.
    per_task: ClassVar[bool] = True
    #: Whether the teachers must adapt and predict for this term (the task loss does not need them).
    needs_teachers: ClassVar[bool] = True

    def __init__(self, weight: float = 1.0, name: str | None = None) -> None:
        super().__init__()
        self.weight = check_weight(weight)
        if name is not None:
            if not isinstance(name, str) or not name.isidentifier():
                raise ValueError(
                    f"a term's name must be a plain identifier (it is logged as train/loss_<name>), "
                    f"got {name!r}."
                )
            self.name = name
        # What student_paths() and teacher_paths() report; a term that taps sets them in bind.
        self._student_paths: list[str] = []
        self._teacher_paths: list[list[str]] = []

    def bind(
        self,
        student: Learner,
        teachers: Sequence[Learner],
        theta_star: Mapping[str, Tensor] | None,
    ) -> None:
        """Prepare for this student and these teachers, once (validate, size projectors, store θ*).

        ``theta_star`` is the anchor teacher's θ* for the student's parameter names (sliced to the
        student's widths when the architectures differ), or ``None`` where no θ* fits the student.
        Raise ``ValueError`` naming the fix when the term cannot work with them.
        """

    def student_paths(self) -> list[str]:
        """Module paths of the student's :attr:`~Learner.model` this term reads (after :meth:`bind`)."""
        return self._student_paths

    def teacher_paths(self, k: int) -> list[str]:
        """Module paths of teacher ``k``'s model this term reads (after :meth:`bind`)."""
        return self._teacher_paths[k] if self._teacher_paths else []

    def forward(self, ctx: Any) -> Tensor:
        """The unweighted value: of one task (:class:`TaskContext`), or of a step (:class:`StepContext`)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weight={self.weight}"


def as_layers(maps: Tensor | Sequence[Tensor], what: str) -> list[Tensor]:
    """One tensor or a non-empty list of them (one per layer), as a list."""
    if isinstance(maps, Tensor):
        return [maps]
    if not isinstance(maps, Sequence) or not all(isinstance(m, Tensor) for m in maps):
        raise TypeError(f"{what} must be a tensor or a list of tensors (one per layer).")
    if not maps:
        raise ValueError(f"{what} is empty; pass at least one layer.")
    return list(maps)


def probe(learner: Learner, paths: Sequence[str]) -> list[Tensor]:
    """What ``paths`` of ``learner.model`` produce on two blank images: validates the paths and
    gives the shapes a term sizes its projectors from."""
    backbone = learner.backbone
    size, channels = getattr(backbone, "image_size", None), getattr(backbone, "in_channels", None)
    if size is None or channels is None:
        raise ValueError(
            f"the backbone {type(backbone).__name__} states no image_size and in_channels, which "
            "distillation terms need to size their projectors; store them as attributes."
        )
    weight = next(learner.parameters())
    blank = torch.zeros(2, channels, size, size, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        _, taps = tapped_call(learner.model, None, blank, paths)
    return [taps[p] for p in paths]


def teacher_name(k: int, count: int) -> str:
    """Teacher ``k`` in messages: "teacher" when it is the only one."""
    return "teacher" if count == 1 else f"teacher {k}"


__all__ = [
    "DistillationTerm",
    "StepContext",
    "TaskContext",
    "as_layers",
    "check_positive",
    "check_weight",
    "probe",
    "teacher_name",
]
