"""DistillationModule: distil meta-trained teachers into a small student that still adapts."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.func import vmap

from lightning_metakd.algorithms import MetaAlgorithm, Params, composite_normalization
from lightning_metakd.data import Episode
from lightning_metakd.distill import (
    FeatureDistillation,
    ParameterAnchor,
    attention_map_loss,
    attention_transfer_loss,
    default_layer_map,
    default_tap,
    ensemble_probabilities,
    ensemble_weights,
    slice_state,
    soft_label_loss,
    tapped_call,
)
from lightning_metakd.models.classifier import Classifier
from lightning_metakd.models.vit import Attention
from lightning_metakd.modules.allocator import configure_cpu_allocator
from lightning_metakd.modules.distributed import destroy_process_group_at_exit
from lightning_metakd.modules.finite import check_finite_loss
from lightning_metakd.modules.meta_learner import (
    MetaLearnerModule,
    MetaLoss,
    chunked_loss,
    evaluation_metrics,
    log_evaluation,
    read_components,
    update_evaluation,
)
from lightning_metakd.modules.precision import configure_tf32
from lightning_metakd.modules.spec import build_component

#: Loss terms in the order they are logged (``train/loss_<term>``) and their weight arguments.
TERMS: dict[str, str] = {
    "task": "task_weight",
    "soft": "soft_label_weight",
    "feature": "feature_weight",
    "attention_transfer": "attention_transfer_weight",
    "attention": "attention_weight",
    "anchor": "anchor_weight",
}


class DistillationLoss(NamedTuple):
    """What :meth:`DistillationModule.distillation_loss` returns."""

    loss: Tensor  #: the objective, ``sum(terms.values())`` (scalar)
    terms: dict[str, Tensor]  #: each weighted term that is on, by name (see :data:`TERMS`)
    accuracy: Tensor  #: the student's query accuracy of each task, ``[T]``
    logits: Tensor  #: the student's query logits, ``[T, N*Q, N]``


def _check_number(name: str, value: float, positive: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        need = "a positive" if positive else "a non-negative"
        fix = "e.g. temperature=4" if positive else f"{name}=0 switches the term off"
        raise ValueError(f"{name} must be {need} finite number, got {name}={value!r}; {fix}.")
    return float(value)


def _store(captured: dict[str, Any], path: str):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        captured[path] = output

    return hook


@contextmanager
def _captured(model: nn.Module, paths: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Outputs of the submodules at ``paths`` during the block (forward hooks, removed after).

    The caller returns what it computes from the captured tensors, never the dict itself, so the
    function that uses it stays pure under :func:`torch.func.vmap`.
    """
    captured: dict[str, Any] = {}
    handles = [model.get_submodule(p).register_forward_hook(_store(captured, p)) for p in paths]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _attention_paths(model: nn.Module, who: str) -> list[str]:
    paths = [name for name, m in model.named_modules() if isinstance(m, Attention)]
    if not paths:
        raise ValueError(
            f"attention_weight > 0 needs attention maps, but the {who} ({type(model).__name__}) has "
            "no VisionTransformer attention layers; use a VisionTransformer backbone or set "
            "attention_weight=0 (attention_transfer_weight distils conv activation maps)."
        )
    return paths


def _block_paths(model: nn.Module, who: str) -> list[str]:
    prefix, net = ("backbone.", model.backbone) if isinstance(model, Classifier) else ("", model)
    blocks = getattr(net, "features", None)
    if not isinstance(blocks, nn.Sequential):
        raise ValueError(
            f"attention_transfer_weight > 0 needs a convolutional backbone with a `features` "
            f"sequence of blocks (Conv4, ResNet12), but the {who} is a {type(net).__name__}; use "
            "attention_weight for a VisionTransformer, or set attention_transfer_weight=0."
        )
    return [f"{prefix}features.{i}" for i in range(len(blocks))]


def _probe_input(backbone: nn.Module, who: str) -> Tensor:
    size, channels = getattr(backbone, "image_size", None), getattr(backbone, "in_channels", None)
    if size is None or channels is None:
        raise ValueError(
            f"the {who} backbone {type(backbone).__name__} states no image_size and in_channels, "
            "which the feature and attention terms need to size their projectors; store them as "
            "attributes of the backbone."
        )
    weight = next(backbone.parameters())
    return torch.zeros(2, channels, size, size, device=weight.device, dtype=weight.dtype)


def _scored(logits: Tensor) -> Tensor:
    """Half-precision logits are scored in float32; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _mix(values: list[Tensor], weights: list[float]) -> Tensor:
    """``Σ_k w_k · values[k]``; one teacher's value as is, so one teacher computes what it always did."""
    if len(values) == 1:
        return values[0]
    total = weights[0] * values[0]
    for weight, value in zip(weights[1:], values[1:], strict=True):
        total = total + weight * value
    return total


class TeacherEnsemble(nn.Module):
    """Several meta-learners as one: each adapts on the same support set, their probabilities average.

    The prediction for a query is ``Σ_k w_k · softmax(z_k)`` (the ensemble of Hinton et al. 2015,
    :func:`~lightning_metakd.distill.ensemble_probabilities` at ``T = 1``), so teachers of different
    algorithms and backbones (a MAML Conv4 and a ProtoNet ResNet12) combine whatever the scale of
    their logits. It is what :class:`DistillationModule` distils with several teachers (at its
    temperature), and a row of the comparison report (:func:`lightning_metakd.report.compare`
    accepts it like a :class:`MetaLearnerModule`). It is not trained.

    Args:
        learners: the meta-learners, in order.
        weights: one non-negative weight per learner, normalised to sum to 1 (``None``: equal).

    Example::

        ensemble = TeacherEnsemble([maml_teacher, protonet_teacher])
        accuracy = ensemble.evaluate(episode).accuracy        # [T], like MetaLearnerModule.evaluate
        states = ensemble.adapt(support_x, support_y)         # one state per learner
        predicted = ensemble.predict(states, query_x).argmax(-1)
    """

    def __init__(
        self, learners: Sequence[MetaLearnerModule], weights: Sequence[float] | None = None
    ) -> None:
        super().__init__()
        if not learners or not all(isinstance(m, MetaLearnerModule) for m in learners):
            raise TypeError("TeacherEnsemble takes a non-empty list of MetaLearnerModules.")
        self.learners = nn.ModuleList(learners)
        self.weights = ensemble_weights(weights, len(learners))

    @property
    def models(self) -> list[nn.Module]:
        """The adapted network of every learner (``learner.model``)."""
        return [learner.model for learner in self.learners]

    def adapt(self, support_x: Tensor, support_y: Tensor) -> list[Any]:
        """Every learner adapts to the support set ``[N*K, C, H, W]``, ``[N*K]``; their states."""
        return [learner.adapt(support_x, support_y) for learner in self.learners]

    def predict(self, states: Sequence[Any], query_x: Tensor) -> Tensor:
        """Log-probabilities ``[M, N]`` of the ensemble for query images ``[M, C, H, W]``."""
        logits = [m.predict(s, query_x) for m, s in zip(self.learners, states, strict=True)]
        return _log(ensemble_probabilities(logits, self.weights))

    def evaluate(self, batch: Episode) -> MetaLoss:
        """Every learner's :meth:`MetaLearnerModule.evaluate`, combined: the ensemble's mean query
        negative log-likelihood, per-task accuracy ``[T]`` and log-probabilities ``[T, N*Q, N]``."""
        logits = [learner.evaluate(batch).logits for learner in self.learners]
        log_probs = _log(ensemble_probabilities([_scored(z) for z in logits], self.weights))
        loss = F.nll_loss(log_probs.flatten(0, 1), batch.query_y.flatten())
        accuracy = (log_probs.argmax(-1) == batch.query_y).float().mean(1)
        return MetaLoss(loss, accuracy, log_probs)


def _log(probs: Tensor) -> Tensor:
    return torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))


class DistillationModule(L.LightningModule):
    """Meta-knowledge distillation: a small student meta-learns from a frozen, meta-trained teacher.

    Distillation is itself meta-learning. For each task of a meta-batch the frozen teacher adapts
    on the support set with its own algorithm and predicts the query set (no graph is kept); the
    student adapts with *its* algorithm (through its inner loop) and predicts the same queries; the
    outer update of the student's initial parameters θ minimises, averaged over tasks,

    ``L = w_task · CE(student, query_y)`` — for a MAML-family student ``L_task(θ − α∇θ L'_task(θ))``
    (Finn et al. 2017)
    ``+ w_soft · T² KL(p_teacher^T ‖ p_student^T)`` — soft labels (Hinton et al. 2015)
    ``+ w_feature · MSE(r(h_student), h_teacher)`` — FitNets hints with a learned projector r
    (Romero et al. 2015), on the query forward pass after adaptation
    ``+ w_at · Σ_j ‖Q_s^j − Q_t^j‖²`` — activation-based attention transfer over the conv blocks
    (Zagoruyko & Komodakis 2017)
    ``+ w_attention · Σ_l ‖A_target^l − A_meta^l‖_F²`` — ViT attention-map distillation
    ``+ w_anchor · ‖θ − θ*‖²`` — MAML-anchored distillation towards the teacher's θ*.

    Only the terms with a positive weight are computed and logged (``train/loss_task``,
    ``train/loss_soft``, ``train/loss_feature``, ``train/loss_attention_transfer``,
    ``train/loss_attention``, ``train/loss_anchor``; each already multiplied by its weight, so they
    add up to ``train/loss``), with ``train/acc`` the student's query accuracy. Validation and test
    evaluate the student alone, exactly like :class:`MetaLearnerModule` (``val/acc``,
    ``val/acc_ci95``, ``test/acc``, ``test/acc_ci95``); :meth:`student_learner` hands the student
    over as a standalone :class:`MetaLearnerModule`.

    The teacher adapts as it would at test time (``training=False``: ``inner_steps_test`` steps),
    so its targets are its best predictions. It is frozen (``requires_grad_(False)``, always in
    eval mode, excluded from the optimiser) and is part of this module's ``state_dict``: a
    distilled checkpoint holds the teacher's weights and components, so it loads on its own with
    :meth:`load_from_checkpoint` even when the teacher's checkpoint is gone. The hyper-parameters
    record the teacher's path, never the object.

    **Several teachers** (``teacher=[...]``, e.g. a MAML Conv4 and a ProtoNet ResNet12) all adapt
    on each task's support set. The soft-label target is their weighted mean of tempered
    probabilities, ``Σ_k w_k softmax(z_k/T)`` (:func:`~lightning_metakd.distill.
    ensemble_probabilities`; ``teacher_weights``, equal by default); the feature, attention
    transfer and attention terms are each the ``w_k``-weighted sum of one term per teacher, and the
    feature term has one projector per teacher. θ* — the student's start with
    ``init_from_teacher`` and the anchor of ``anchor_weight`` — comes from the one teacher
    ``anchor_teacher`` picks (an average of θ* over different backbones has no meaning). Teacher
    ``k`` is the submodule ``teacher`` for ``k = 0`` and ``teacher_<k>`` otherwise, its projector
    ``feature_distillation``/``feature_distillation_<k>``: a one-teacher module keeps the state
    names it always had. :attr:`teachers` lists them; :meth:`teacher_ensemble` evaluates them as
    one learner. With one teacher (a module, a path, or a list of one) nothing changes.

    Args:
        teacher: a :class:`MetaLearnerModule` or the path of its checkpoint, or a list of them
            (several teachers). A path is read lazily — in :meth:`setup`, when a ``Trainer``
            starts, or at first use — so a config can name a teacher that is not trained yet; a
            missing or wrong file fails there, clearly.
        student_backbone: the student's feature extractor (``Conv4(hidden=16)``, a smaller ViT, ...).
        student_algorithm: the student's :class:`~lightning_metakd.algorithms.MetaAlgorithm`.
        ways: classes per training task (sizes a MAML-family head; must equal the teacher's for a
            head teacher).
        task_weight, soft_label_weight, feature_weight, attention_transfer_weight,
        attention_weight, anchor_weight: the weights (≥ 0; 0 switches a term off).
        temperature: soft-label temperature ``T > 0``.
        feature_taps: ``[student path, teacher path]`` of the hinted layers (module paths of the
            adapted models, see :func:`~lightning_metakd.distill.module_paths`), the teacher path
            used for every teacher; or ``[student path, teacher 0 path, teacher 1 path, ...]``;
            default :func:`~lightning_metakd.distill.default_tap` of each.
        attention_kind: ``"frobenius"`` or ``"kl"`` for the attention-map term.
        layer_map: teacher attention layer for each student layer, for every teacher (default
            :func:`~lightning_metakd.distill.default_layer_map` of each teacher's depth).
        init_from_teacher: start the student from the teacher's θ* — copied when the
            architectures are equal, else sliced to the student's widths by
            :func:`~lightning_metakd.distill.slice_state` (largest-L1 filters) — and anchor to it.
            Without it the anchor is the teacher's θ* as is, which needs the same architecture.
        teacher_weights: with several teachers, one weight ≥ 0 per teacher (normalised to sum to
            1; 0 leaves a teacher out); ``None``: equal weights.
        anchor_teacher: the index of the teacher whose θ* ``init_from_teacher`` and the anchor use.
        vmap_tasks, task_chunk_size: as for :class:`MetaLearnerModule` (the same per-task
            function runs in a loop or under ``torch.func.vmap``; chunks bound memory).
        optimizer, lr_scheduler: the outer optimiser (on the student and the projectors only) and
            an optional scheduler, as callables (LightningCLI: ``class_path``).
        allow_tf32: as for :class:`MetaLearnerModule` (TF32 is turned off on CUDA for a
            gradient-based student inner loop unless this is ``True``).
        tune_cpu_allocator: as for :class:`MetaLearnerModule` (glibc malloc tuned for CPU runs).

    Example — a Conv4-16 ProtoNet student of a Conv4-64 teacher, soft labels on::

        distiller = DistillationModule("teacher.ckpt", Conv4(hidden=16), ProtoNet(), ways=20)
        L.Trainer(max_epochs=5).fit(distiller, datamodule)
        student = distiller.student_learner()   # a MetaLearnerModule, no teacher needed
        state = student.adapt(support_x, support_y)
    """

    def __init__(
        self,
        teacher: str | MetaLearnerModule | list[str | MetaLearnerModule],
        student_backbone: nn.Module,
        student_algorithm: MetaAlgorithm,
        ways: int = 5,
        task_weight: float = 1.0,
        soft_label_weight: float = 1.0,
        temperature: float = 4.0,
        feature_weight: float = 0.0,
        feature_taps: list[str] | None = None,
        attention_transfer_weight: float = 0.0,
        attention_weight: float = 0.0,
        attention_kind: str = "frobenius",
        layer_map: list[int] | None = None,
        anchor_weight: float = 0.0,
        init_from_teacher: bool = False,
        teacher_weights: list[float] | None = None,
        anchor_teacher: int = 0,
        vmap_tasks: bool | None = None,
        task_chunk_size: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        allow_tf32: bool = False,
        tune_cpu_allocator: bool = True,
    ) -> None:
        super().__init__()
        self.allow_tf32, self.tune_cpu_allocator = allow_tf32, tune_cpu_allocator
        given = dict(
            task_weight=task_weight, soft_label_weight=soft_label_weight,
            feature_weight=feature_weight, attention_transfer_weight=attention_transfer_weight,
            attention_weight=attention_weight, anchor_weight=anchor_weight,
        )  # fmt: skip
        self.weights = {term: _check_number(arg, given[arg]) for term, arg in TERMS.items()}
        if not any(self.weights.values()):
            raise ValueError(
                "every loss weight is 0, so there is nothing to train; set task_weight=1 and at "
                "least one distillation weight (e.g. soft_label_weight=1)."
            )
        self.temperature = _check_number("temperature", temperature, positive=True)
        if attention_kind not in ("frobenius", "kl"):
            raise ValueError(f"attention_kind must be 'frobenius' or 'kl', got {attention_kind!r}.")
        several = isinstance(teacher, list | tuple)
        sources = list(teacher) if several else [teacher]
        if not sources or not all(isinstance(t, str | Path | MetaLearnerModule) for t in sources):
            got = [type(t).__name__ for t in sources] if several else type(teacher).__name__
            raise TypeError(
                f"teacher must be a MetaLearnerModule or the path of its checkpoint, or a non-empty "
                f"list of them (several teachers), got {got}."
            )
        count = len(sources)
        if feature_taps is not None and len(feature_taps) not in (2, 1 + count):
            more = "" if count == 1 else ", or [student path, teacher 0 path, teacher 1 path, ...]"
            raise ValueError(
                f"feature_taps must be [student path, teacher path]{more}, got {feature_taps!r}."
            )
        self.teacher_weights = ensemble_weights(teacher_weights, count)
        if (
            not isinstance(anchor_teacher, int)
            or isinstance(anchor_teacher, bool)
            or not 0 <= anchor_teacher < count
        ):
            raise ValueError(
                f"anchor_teacher must be the index of a teacher, 0 to {count - 1}, got "
                f"{anchor_teacher!r}; it picks the teacher whose θ* init_from_teacher and the "
                "anchor use."
            )
        self.save_hyperparameters(
            ignore=["teacher", "student_backbone", "student_algorithm", "optimizer", "lr_scheduler"]
        )
        paths = [None if isinstance(t, MetaLearnerModule) else str(t) for t in sources]
        self.hparams["teacher"] = paths if several else paths[0]
        self.num_teachers, self.anchor_teacher = count, anchor_teacher
        self.ways = ways
        self.feature_taps, self.attention_kind = feature_taps, attention_kind
        self.layer_map = None if layer_map is None else list(layer_map)
        self.init_from_teacher = init_from_teacher
        self.student = _learner(
            student_backbone, student_algorithm, ways, vmap_tasks, task_chunk_size
        )
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.metrics = evaluation_metrics()
        self.teacher: MetaLearnerModule | None = None
        self._sources: list[str | Path | MetaLearnerModule] = sources
        # term -> (student paths, [paths of teacher k for k in teachers])
        self._paths: dict[str, tuple[list[str], list[list[str]]]] = {}
        self._layer_maps: list[list[int]] = []
        if all(isinstance(t, MetaLearnerModule) for t in sources):
            self._attach_teachers(sources)

    # -- the teachers -----------------------------------------------------------------------------
    @property
    def teachers(self) -> list[MetaLearnerModule]:
        """Every teacher, in the order given (empty while a teacher path is not loaded yet)."""
        if self.teacher is None:
            return []
        return [self.teacher, *(getattr(self, f"teacher_{k}") for k in range(1, self.num_teachers))]

    def _who(self, k: int) -> str:
        """Teacher ``k`` in messages: "teacher" when it is the only one."""
        return "teacher" if self.num_teachers == 1 else f"teacher {k}"

    def feature_projector(self, k: int = 0) -> FeatureDistillation:
        """The feature term's projector of teacher ``k`` (``feature_weight > 0``)."""
        return getattr(self, "feature_distillation" if k == 0 else f"feature_distillation_{k}")

    def _attach_teachers(self, teachers: list[MetaLearnerModule]) -> None:
        """Freeze the teachers and build everything that depends on them (θ*, projectors, taps)."""
        for k, teacher in enumerate(teachers):
            if teacher.algorithm.needs_head and teacher.ways != self.ways:
                raise ValueError(
                    f"the {self._who(k)}'s {type(teacher.algorithm).__name__} head is "
                    f"{teacher.ways}-way but this module trains {self.ways}-way tasks (ways="
                    f"{self.ways}); set ways={teacher.ways} and the data's ways to match, or use a "
                    f"teacher trained for {self.ways}-way tasks."
                )
        for k, teacher in enumerate(teachers):
            teacher.freeze()
            # Beside the student (a teacher trained on a GPU loads onto it); Lightning then moves
            # the whole module, teachers included, to the run's device.
            device = next(self.student.parameters()).device
            setattr(self, "teacher" if k == 0 else f"teacher_{k}", teacher.to(device))
        self._sources = []
        self._attach_theta_star(teachers[self.anchor_teacher])
        student, weights = self.student.model, self.weights
        if weights["feature"]:
            s_path = self.feature_taps[0] if self.feature_taps else default_tap(student)
            t_paths = []
            for k, teacher in enumerate(teachers):
                t_path = default_tap(teacher.model)
                if self.feature_taps:
                    t_path = self.feature_taps[1 if len(self.feature_taps) == 2 else 1 + k]
                s_out, t_out = self._probe(teacher, s_path, t_path, self._who(k))
                kind = "map" if s_out.dim() == 4 and t_out.dim() == 4 else "vector"
                dims = (s_out.shape[1], t_out.shape[1]) if kind == "map" else (s_out.shape[-1], t_out.shape[-1])  # fmt: skip
                name = "feature_distillation" if k == 0 else f"feature_distillation_{k}"
                setattr(self, name, FeatureDistillation(*dims, kind=kind))
                t_paths.append([t_path])
            self._paths["feature"] = ([s_path], t_paths)
        if weights["attention_transfer"]:
            s_paths, t_paths = _block_paths(student, "student"), []
            for k, teacher in enumerate(teachers):
                t_paths.append(_block_paths(teacher.model, self._who(k)))
                if len(s_paths) != len(t_paths[k]):
                    raise ValueError(
                        f"attention transfer pairs conv blocks one to one, but the student has "
                        f"{len(s_paths)} and the {self._who(k)} {len(t_paths[k])}; use backbones "
                        "of equal depth."
                    )
            self._paths["attention_transfer"] = (s_paths, t_paths)
        if weights["attention"]:
            s_paths, t_paths = _attention_paths(student, "student"), []
            for k, teacher in enumerate(teachers):
                t_paths.append(_attention_paths(teacher.model, self._who(k)))
                s_maps, t_maps = self._probe(teacher, s_paths, t_paths[k], self._who(k))
                attention_map_loss(s_maps, t_maps, self.layer_map, self.attention_kind)  # validates
                given = self.layer_map
                self._layer_maps.append(
                    default_layer_map(len(s_paths), len(t_paths[k])) if given is None else given
                )
            self._paths["attention"] = (s_paths, t_paths)
            self.layer_map = self._layer_maps[0]

    def _attach_theta_star(self, teacher: MetaLearnerModule) -> None:
        """θ* of ``teacher`` (``anchor_teacher``): the student's start and the anchor, if on."""
        student = self.student.model
        try:
            if self.init_from_teacher:
                theta_star = self._theta_star(teacher.model, student)
                student.load_state_dict(theta_star)
            else:
                theta_star = {k: v.detach() for k, v in teacher.model.state_dict().items()}
            if self.weights["anchor"]:
                params = dict(student.named_parameters())
                self.anchor = ParameterAnchor({n: t for n, t in theta_star.items() if n in params})
                with torch.no_grad():  # shape or name mismatches fail now, with its message
                    self.anchor(params)
        except ValueError as err:
            if self.num_teachers == 1:
                raise
            k = self.anchor_teacher
            raise ValueError(
                f"θ* comes from teacher {k} (anchor_teacher={k}), a {type(teacher.algorithm).__name__} "
                f"{type(teacher.backbone).__name__}, which does not fit the student: {err} Set "
                "anchor_teacher to a teacher of the student's family, or turn init_from_teacher "
                "and anchor_weight off."
            ) from None

    @staticmethod
    def _theta_star(teacher: nn.Module, student: nn.Module) -> dict[str, Tensor]:
        """θ* for ``student``: the teacher's state when shapes agree, else :func:`slice_state`."""
        t_state, s_state = teacher.state_dict(), student.state_dict()
        if set(t_state) == set(s_state) and all(
            t_state[k].shape == v.shape for k, v in s_state.items()
        ):
            return {k: v.detach().clone() for k, v in t_state.items()}
        return slice_state(teacher, student)

    def _probe(
        self,
        teacher: MetaLearnerModule,
        s_paths: str | list[str],
        t_paths: str | list[str],
        who: str = "teacher",
    ) -> tuple[Any, Any]:
        """What the taps give on two blank images (validates paths, sizes the projector)."""
        outputs = []
        for model, backbone, paths, name in (
            (self.student.model, self.student.backbone, s_paths, "student"),
            (teacher.model, teacher.backbone, t_paths, who),
        ):
            with torch.no_grad():
                _, taps = tapped_call(model, None, _probe_input(backbone, name), paths)
            device = next(self.student.parameters()).device
            values = [_tapped_tensor(v).to(device) for v in taps.values()]
            outputs.append(values[0] if isinstance(paths, str) else values)
        return outputs[0], outputs[1]

    def _require_teacher(self) -> MetaLearnerModule:
        """The (first) teacher, once every teacher given as a path is loaded and attached."""
        if self.teacher is None:
            teachers = []
            for source in self._sources:
                if not isinstance(source, MetaLearnerModule):
                    if not Path(source).exists():
                        raise FileNotFoundError(
                            f"No teacher checkpoint at {source}; train the teacher first (e.g. "
                            "`metakd fit --config configs/kanji/protonet.yaml`) or pass "
                            "model.teacher=<checkpoint>."
                        )
                    source = MetaLearnerModule.load_from_checkpoint(source, map_location="cpu")
                teachers.append(source)
            self._attach_teachers(teachers)
        return self.teacher

    def teacher_ensemble(self) -> TeacherEnsemble:
        """The teachers as one learner (weights ``teacher_weights``), sharing their modules.

        Its probabilities are the soft-label target at ``T = 1``; the report measures it.
        """
        self._require_teacher()
        return TeacherEnsemble(self.teachers, self.teacher_weights)

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()
        self._require_teacher()
        for k, teacher in enumerate(self.teachers):
            teacher.check_data(self._trainer, stage, self._who(k), training_only=True)
        self.student.check_data(self._trainer, stage, "student")
        configure_tf32(self._trainer, self.student.algorithm, self.allow_tf32)
        configure_cpu_allocator(self._trainer, self.tune_cpu_allocator)

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()  # frozen: dropout off, whatever the Trainer does to this module
        return self

    # -- the method -------------------------------------------------------------------------------
    def _task_terms(
        self,
        student_params: Params,
        teacher_params: list[Params],
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        ways: int,
        training: bool,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Student query logits ``[N*Q, N]`` and the weighted per-task terms of ONE task.

        The single function that both the loop and the vmap path of :meth:`distillation_loss`
        call; taps are taken on the query forward pass after adaptation and leave only as terms.
        Every teacher adapts on the same support set; ``teacher_params[k]`` are teacher ``k``'s.
        """
        teachers, student, weights, paths = self.teachers, self.student, self.weights, self._paths
        t_logits, t_taps = [], []
        with torch.no_grad():
            for k, (teacher, params) in enumerate(zip(teachers, teacher_params, strict=True)):
                t_state = teacher.algorithm.adapt(
                    teacher.model, params, support_x, support_y, ways, training=False
                )
                tapped = [p for _, t in paths.values() for p in t[k]]
                with _captured(teacher.model, tapped) as taps:
                    t_logits.append(
                        teacher.algorithm.logits(teacher.model, params, t_state, query_x, ways)
                    )
                t_taps.append(taps)
        s_state = student.algorithm.adapt(
            student.model, student_params, support_x, support_y, ways, training
        )
        with _captured(student.model, [p for s, _ in paths.values() for p in s]) as s_taps:
            logits = student.algorithm.logits(student.model, student_params, s_state, query_x, ways)

        def teacher_term(term: str, k: int) -> Tensor:
            """The unweighted feature / attention term of teacher ``k``."""
            s, t = paths[term]
            s_maps = [_tapped_tensor(s_taps[p]) for p in s]
            t_maps = [_tapped_tensor(t_taps[k][p]) for p in t[k]]
            if term == "feature":
                return self.feature_projector(k)(s_maps[0], t_maps[0])
            if term == "attention_transfer":
                return attention_transfer_loss(s_maps, t_maps)
            return attention_map_loss(s_maps, t_maps, self._layer_maps[k], self.attention_kind)

        terms: dict[str, Tensor] = {}
        if weights["task"]:
            terms["task"] = weights["task"] * F.cross_entropy(_scored(logits), query_y)
        if weights["soft"]:
            if len(teachers) == 1:
                soft = soft_label_loss(_scored(logits), _scored(t_logits[0]), self.temperature)
            else:
                probs = ensemble_probabilities(
                    [_scored(z) for z in t_logits], self.teacher_weights, self.temperature
                )
                soft = soft_label_loss(_scored(logits), None, self.temperature, teacher_probs=probs)
            terms["soft"] = weights["soft"] * soft
        for term in ("feature", "attention_transfer", "attention"):
            if weights[term]:
                each = [teacher_term(term, k) for k in range(len(teachers))]
                terms[term] = weights[term] * _mix(each, self.teacher_weights)
        return logits, terms

    def distillation_loss(self, batch: Episode, training: bool = True) -> DistillationLoss:
        """The distillation objective of an episode, each term, and the student's accuracy.

        Per-task terms are averaged over the ``T`` tasks; the anchor (a function of θ alone) is
        added once. ``loss == sum(terms.values())``.
        """
        self._require_teacher()
        self._check_episode(batch)
        s_params = dict(self.student.model.named_parameters())
        t_params = [
            {k: v.detach() for k, v in teacher.model.named_parameters()}
            for teacher in self.teachers
        ]
        vmap_tasks = self.student.vmap_tasks
        if vmap_tasks is None:
            vmap_tasks = batch.support_x.device.type != "cpu"

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
            return self._task_terms(s_params, t_params, sx, sy, qx, qy, batch.ways, training)

        tensors = (batch.support_x, batch.support_y, batch.query_x, batch.query_y)
        if vmap_tasks:
            batched = vmap(
                one_task, randomness="different", chunk_size=self.student.task_chunk_size
            )
            with composite_normalization():
                logits, per_task = batched(*tensors)
        else:
            outputs = [one_task(*task) for task in zip(*tensors, strict=True)]
            logits = torch.stack([out[0] for out in outputs])
            per_task = {k: torch.stack([out[1][k] for out in outputs]) for k in outputs[0][1]}
        terms = {k: v.mean() for k, v in per_task.items()}
        if self.weights["anchor"]:
            terms["anchor"] = self.weights["anchor"] * self.anchor(s_params)
        loss = torch.stack(list(terms.values())).sum()
        accuracy = (logits.argmax(-1) == batch.query_y).float().mean(1)
        return DistillationLoss(loss, terms, accuracy, logits)

    def student_learner(self) -> MetaLearnerModule:
        """The student as a standalone :class:`MetaLearnerModule` (a copy; no teacher inside).

        Evaluate it, save it with a ``Trainer``, or adapt it with ``adapt``/``predict``.
        """
        self._require_teacher()  # with init_from_teacher, the student starts from θ*
        components = self.student.components
        learner = _learner(
            build_component(components["backbone"]),
            build_component(components["algorithm"]),
            self.ways,
            self.student.vmap_tasks,
            self.student.task_chunk_size,
        )
        learner.load_state_dict(self.student.state_dict())
        return learner.to(self.device)

    # -- Lightning hooks --------------------------------------------------------------------------
    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:
        accuracies: list[Tensor] = []
        terms: dict[str, Tensor] = {}

        def chunk_loss(chunk: Episode) -> Tensor:
            out = self.distillation_loss(chunk, training=True)
            accuracies.append(out.accuracy.detach())
            for name, value in out.terms.items():
                share = value.detach() * (chunk.num_tasks / batch.num_tasks)
                terms[name] = terms[name] + share if name in terms else share
            return out.loss

        size = self.student.training_chunk_size(batch)
        loss = chunked_loss(batch, size, chunk_loss, self.parameters())
        n = batch.num_tasks
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, batch_size=n, sync_dist=True)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=n, sync_dist=True)
        self.log(
            "train/acc", torch.cat(accuracies).mean(), prog_bar=True, batch_size=n, sync_dist=True
        )
        check_finite_loss(self, batch_idx, loss, terms)
        return loss

    def _evaluation_step(self, batch: Episode, split: str) -> None:
        update_evaluation(self.metrics, split, self.student.evaluate(batch), batch.num_tasks)

    def predict_step(self, batch: Episode, batch_idx: int) -> dict[str, Tensor]:
        """The student's predictions on the query sets after adapting (``metakd predict``)."""
        return self.student.predict_step(batch, batch_idx)

    def validation_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluation_step(batch, "val")

    def test_step(self, batch: Episode, batch_idx: int) -> None:
        self._evaluation_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        log_evaluation(self, self.metrics, "val")

    def on_test_epoch_end(self) -> None:
        log_evaluation(self, self.metrics, "test")

    def configure_optimizers(self) -> Any:
        self._require_teacher()  # a projector sized from the teacher must exist before this
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    # -- checks and checkpoints -------------------------------------------------------------------
    def _check_episode(self, batch: Episode) -> None:
        self.student._check_episode(batch)
        for k, teacher in enumerate(self.teachers):
            try:
                teacher._check_episode(batch)
            except ValueError as err:
                who = "The teacher" if self.num_teachers == 1 else f"Teacher {k}"
                raise ValueError(f"{who} does not fit the episode: {err}") from None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._require_teacher()
        specs = [{**teacher.components, "ways": teacher.ways} for teacher in self.teachers]
        checkpoint["metakd_components"] = {
            "teacher": specs[0],
            "student_backbone": self.student.components["backbone"],
            "student_algorithm": self.student.components["algorithm"],
        }
        if len(specs) > 1:
            checkpoint["metakd_components"]["teachers"] = specs

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any
    ) -> DistillationModule:
        """Rebuild the module — teacher, student and projectors — from a checkpoint file alone.

        The teachers' components and weights are in the checkpoint; their original files are not
        read.
        """
        path = Path(checkpoint_path)
        components = read_components(
            path, cls.__name__, ("teacher", "student_backbone", "student_algorithm")
        )
        teachers = [
            MetaLearnerModule(
                build_component(spec["backbone"]), build_component(spec["algorithm"]), spec["ways"]
            )
            for spec in components.get("teachers", [components["teacher"]])
        ]
        kwargs.setdefault("teacher", teachers if "teachers" in components else teachers[0])
        kwargs.setdefault("student_backbone", build_component(components["student_backbone"]))
        kwargs.setdefault("student_algorithm", build_component(components["student_algorithm"]))
        return super().load_from_checkpoint(
            path, map_location=map_location, weights_only=True, **kwargs
        )


def _learner(
    backbone: nn.Module,
    algorithm: MetaAlgorithm,
    ways: int,
    vmap_tasks: bool | None = None,
    task_chunk_size: int | None = None,
) -> MetaLearnerModule:
    # Built outside DistillationModule.__init__: Lightning's save_hyperparameters walks up the
    # frames of enclosing __init__ calls and would copy the distiller's arguments into the learner.
    return MetaLearnerModule(backbone, algorithm, ways, vmap_tasks, task_chunk_size)


def _tapped_tensor(output: Any) -> Tensor:
    """The tensor a tapped module produced (ViT ``Attention`` returns ``(out, attention)``)."""
    return output[1] if isinstance(output, tuple) else output


__all__ = ["TERMS", "DistillationLoss", "DistillationModule", "TeacherEnsemble"]
