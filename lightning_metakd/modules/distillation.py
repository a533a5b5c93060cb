"""DistillationModule: distil a meta-trained teacher into a small student that still adapts."""

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
    slice_state,
    soft_label_loss,
    tapped_call,
)
from lightning_metakd.models.classifier import Classifier
from lightning_metakd.models.vit import Attention
from lightning_metakd.modules.distributed import destroy_process_group_at_exit
from lightning_metakd.modules.meta_learner import (
    MetaLearnerModule,
    chunked_loss,
    evaluation_metrics,
    log_evaluation,
    read_components,
    update_evaluation,
)
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
    device = next(backbone.parameters()).device
    return torch.zeros(2, channels, size, size, device=device)


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

    Args:
        teacher: a :class:`MetaLearnerModule` or the path of its checkpoint. A path is read
            lazily — in :meth:`setup`, when a ``Trainer`` starts, or at first use — so a config can
            name a teacher that is not trained yet; a missing or wrong file fails there, clearly.
        student_backbone: the student's feature extractor (``Conv4(hidden=16)``, a smaller ViT, ...).
        student_algorithm: the student's :class:`~lightning_metakd.algorithms.MetaAlgorithm`.
        ways: classes per training task (sizes a MAML-family head; must equal the teacher's for a
            head teacher).
        task_weight, soft_label_weight, feature_weight, attention_transfer_weight,
        attention_weight, anchor_weight: the weights (≥ 0; 0 switches a term off).
        temperature: soft-label temperature ``T > 0``.
        feature_taps: ``[student path, teacher path]`` of the hinted layers (module paths of the
            adapted models, see :func:`~lightning_metakd.distill.module_paths`); default
            :func:`~lightning_metakd.distill.default_tap` of each.
        attention_kind: ``"frobenius"`` or ``"kl"`` for the attention-map term.
        layer_map: teacher attention layer for each student layer (default
            :func:`~lightning_metakd.distill.default_layer_map`).
        init_from_teacher: start the student from the teacher's θ* — copied when the
            architectures are equal, else sliced to the student's widths by
            :func:`~lightning_metakd.distill.slice_state` (largest-L1 filters) — and anchor to it.
            Without it the anchor is the teacher's θ* as is, which needs the same architecture.
        vmap_tasks, task_chunk_size: as for :class:`MetaLearnerModule` (the same per-task
            function runs in a loop or under ``torch.func.vmap``; chunks bound memory).
        optimizer, lr_scheduler: the outer optimiser (on the student and the projectors only) and
            an optional scheduler, as callables (LightningCLI: ``class_path``).

    Example — a Conv4-16 ProtoNet student of a Conv4-64 teacher, soft labels on::

        distiller = DistillationModule("teacher.ckpt", Conv4(hidden=16), ProtoNet(), ways=20)
        L.Trainer(max_epochs=5).fit(distiller, datamodule)
        student = distiller.student_learner()   # a MetaLearnerModule, no teacher needed
        state = student.adapt(support_x, support_y)
    """

    def __init__(
        self,
        teacher: str | MetaLearnerModule,
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
        vmap_tasks: bool | None = None,
        task_chunk_size: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
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
        if feature_taps is not None and len(feature_taps) != 2:
            raise ValueError(
                f"feature_taps must be [student path, teacher path], got {feature_taps!r}."
            )
        if not isinstance(teacher, str | Path | MetaLearnerModule):
            raise TypeError(
                f"teacher must be a MetaLearnerModule or the path of its checkpoint, got "
                f"{type(teacher).__name__}."
            )
        self.save_hyperparameters(
            ignore=["teacher", "student_backbone", "student_algorithm", "optimizer", "lr_scheduler"]
        )
        self.hparams["teacher"] = None if isinstance(teacher, MetaLearnerModule) else str(teacher)
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
        self._paths: dict[str, tuple[list[str], list[str]]] = {}
        if isinstance(teacher, MetaLearnerModule):
            self._attach_teacher(teacher)

    # -- the teacher ------------------------------------------------------------------------------
    def _attach_teacher(self, teacher: MetaLearnerModule) -> None:
        """Freeze ``teacher`` and build everything that depends on it (θ*, projector, taps)."""
        if teacher.algorithm.needs_head and teacher.ways != self.ways:
            raise ValueError(
                f"the teacher's {type(teacher.algorithm).__name__} head is {teacher.ways}-way but "
                f"this module trains {self.ways}-way tasks (ways={self.ways}); set ways="
                f"{teacher.ways} and the data's ways to match, or use a teacher trained for "
                f"{self.ways}-way tasks."
            )
        teacher.freeze()
        self.teacher = teacher.to(self.device)
        student, weights = self.student.model, self.weights
        if self.init_from_teacher:
            theta_star = self._theta_star(teacher.model, student)
            student.load_state_dict(theta_star)
        else:
            theta_star = {k: v.detach() for k, v in teacher.model.state_dict().items()}
        if weights["anchor"]:
            params = dict(student.named_parameters())
            self.anchor = ParameterAnchor({n: t for n, t in theta_star.items() if n in params})
            with torch.no_grad():
                self.anchor(params)  # shape or name mismatches fail now, with the anchor's message
        if weights["feature"]:
            s_path, t_path = self.feature_taps or [default_tap(student), default_tap(teacher.model)]
            s_out, t_out = self._probe(s_path, t_path)
            kind = "map" if s_out.dim() == 4 and t_out.dim() == 4 else "vector"
            dims = (s_out.shape[1], t_out.shape[1]) if kind == "map" else (s_out.shape[-1], t_out.shape[-1])  # fmt: skip
            self.feature_distillation = FeatureDistillation(*dims, kind=kind)
            self._paths["feature"] = ([s_path], [t_path])
        if weights["attention_transfer"]:
            paths = (_block_paths(student, "student"), _block_paths(teacher.model, "teacher"))
            if len(paths[0]) != len(paths[1]):
                raise ValueError(
                    f"attention transfer pairs conv blocks one to one, but the student has "
                    f"{len(paths[0])} and the teacher {len(paths[1])}; use backbones of equal depth."
                )
            self._paths["attention_transfer"] = paths
        if weights["attention"]:
            paths = (_attention_paths(student, "student"), _attention_paths(teacher.model, "teacher"))  # fmt: skip
            s_maps, t_maps = self._probe(*paths)
            attention_map_loss(s_maps, t_maps, self.layer_map, self.attention_kind)  # validates
            self._paths["attention"] = paths
        if self.layer_map is None and "attention" in self._paths:
            self.layer_map = default_layer_map(*map(len, self._paths["attention"]))

    @staticmethod
    def _theta_star(teacher: nn.Module, student: nn.Module) -> dict[str, Tensor]:
        """θ* for ``student``: the teacher's state when shapes agree, else :func:`slice_state`."""
        t_state, s_state = teacher.state_dict(), student.state_dict()
        if set(t_state) == set(s_state) and all(
            t_state[k].shape == v.shape for k, v in s_state.items()
        ):
            return {k: v.detach().clone() for k, v in t_state.items()}
        return slice_state(teacher, student)

    def _probe(self, s_paths: str | list[str], t_paths: str | list[str]) -> tuple[Any, Any]:
        """What the taps give on two blank images (validates paths, sizes the projector)."""
        outputs = []
        for model, backbone, paths, who in (
            (self.student.model, self.student.backbone, s_paths, "student"),
            (self.teacher.model, self.teacher.backbone, t_paths, "teacher"),
        ):
            with torch.no_grad():
                _, taps = tapped_call(model, None, _probe_input(backbone, who), paths)
            values = [_tapped_tensor(v) for v in taps.values()]
            outputs.append(values[0] if isinstance(paths, str) else values)
        return outputs[0], outputs[1]

    def _require_teacher(self) -> MetaLearnerModule:
        if self.teacher is None:
            path = self.hparams["teacher"]
            if not Path(path).exists():
                raise FileNotFoundError(
                    f"No teacher checkpoint at {path}; train the teacher first (e.g. `metakd fit "
                    "--config configs/kanji/protonet.yaml`) or pass model.teacher=<checkpoint>."
                )
            self._attach_teacher(MetaLearnerModule.load_from_checkpoint(path))
        return self.teacher

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()
        self._require_teacher()

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: dropout off, whatever the Trainer does to this module
        return self

    # -- the method -------------------------------------------------------------------------------
    def _task_terms(
        self,
        student_params: Params,
        teacher_params: Params,
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
        """
        teacher, student, weights, paths = self.teacher, self.student, self.weights, self._paths
        with torch.no_grad():
            t_state = teacher.algorithm.adapt(
                teacher.model, teacher_params, support_x, support_y, ways, training=False
            )
            with _captured(teacher.model, [p for _, t in paths.values() for p in t]) as t_taps:
                t_logits = teacher.algorithm.logits(
                    teacher.model, teacher_params, t_state, query_x, ways
                )
        s_state = student.algorithm.adapt(
            student.model, student_params, support_x, support_y, ways, training
        )
        with _captured(student.model, [p for s, _ in paths.values() for p in s]) as s_taps:
            logits = student.algorithm.logits(student.model, student_params, s_state, query_x, ways)

        def maps(term: str) -> tuple[list[Tensor], list[Tensor]]:
            s, t = paths[term]
            return [_tapped_tensor(s_taps[p]) for p in s], [_tapped_tensor(t_taps[p]) for p in t]

        terms: dict[str, Tensor] = {}
        if weights["task"]:
            terms["task"] = weights["task"] * F.cross_entropy(logits.float(), query_y)
        if weights["soft"]:
            soft = soft_label_loss(logits.float(), t_logits.float(), self.temperature)
            terms["soft"] = weights["soft"] * soft
        if weights["feature"]:
            (s,), (t,) = maps("feature")
            terms["feature"] = weights["feature"] * self.feature_distillation(s, t)
        if weights["attention_transfer"]:
            at = attention_transfer_loss(*maps("attention_transfer"))
            terms["attention_transfer"] = weights["attention_transfer"] * at
        if weights["attention"]:
            a = attention_map_loss(*maps("attention"), self.layer_map, self.attention_kind)
            terms["attention"] = weights["attention"] * a
        return logits, terms

    def distillation_loss(self, batch: Episode, training: bool = True) -> DistillationLoss:
        """The distillation objective of an episode, each term, and the student's accuracy.

        Per-task terms are averaged over the ``T`` tasks; the anchor (a function of θ alone) is
        added once. ``loss == sum(terms.values())``.
        """
        teacher = self._require_teacher()
        self._check_episode(batch)
        s_params = dict(self.student.model.named_parameters())
        t_params = {k: v.detach() for k, v in teacher.model.named_parameters()}
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
        try:
            self.teacher._check_episode(batch)
        except ValueError as err:
            raise ValueError(f"The teacher does not fit the episode: {err}") from None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        teacher = self._require_teacher()
        checkpoint["metakd_components"] = {
            "teacher": {**teacher.components, "ways": teacher.ways},
            "student_backbone": self.student.components["backbone"],
            "student_algorithm": self.student.components["algorithm"],
        }

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls, checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any
    ) -> DistillationModule:
        """Rebuild the module — teacher, student and projectors — from a checkpoint file alone.

        The teacher's components and weights are in the checkpoint; its original file is not read.
        """
        path = Path(checkpoint_path)
        components = read_components(
            path, cls.__name__, ("teacher", "student_backbone", "student_algorithm")
        )
        spec = components["teacher"]
        teacher = MetaLearnerModule(
            build_component(spec["backbone"]), build_component(spec["algorithm"]), spec["ways"]
        )
        kwargs.setdefault("teacher", teacher)
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


__all__ = ["TERMS", "DistillationLoss", "DistillationModule"]
