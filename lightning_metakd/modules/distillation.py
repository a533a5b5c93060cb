"""DistillationModule: distil meta-trained teachers into a small student that still adapts."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_metakd.algorithms import EpisodeLoss, Learner, MetaAlgorithm, Params, map_tasks
from lightning_metakd.algorithms.normalization import POLICIES
from lightning_metakd.data import Episode
from lightning_metakd.distill import (
    DistillationTerm,
    SoftLabels,
    StepContext,
    TaskContext,
    TaskLoss,
    TeacherEnsemble,
    ensemble_weights,
    tap,
)
from lightning_metakd.distill.cache import TeacherCache
from lightning_metakd.distill.term import teacher_name
from lightning_metakd.distill.transfer import ChannelSelection, resolve_selection
from lightning_metakd.modules.episodic import EpisodicModule
from lightning_metakd.modules.teachers import (
    TeacherSource,
    calibrate_teachers,
    check_terms,
    load_teacher,
    teachers_on_task,
    theta_star,
)
from lightning_metakd.spec import component_spec

#: ``teacher_normalization="auto"``: population statistics where they make a teacher cacheable.
AUTO = "auto"


class DistillationModule(EpisodicModule):
    """Meta-knowledge distillation: a small student meta-learns from frozen, meta-trained teachers.

    Distillation is itself meta-learning. For each task of a meta-batch the frozen teachers adapt
    on the support set with their own algorithms and predict the query set (no graph is kept); the
    student adapts with *its* algorithm (through its inner loop) and predicts the same queries; the
    outer update of the student's initial parameters θ minimises, averaged over tasks,
    ``L = Σ_i w_i · term_i`` over the :class:`~lightning_metakd.distill.DistillationTerm` s in
    ``terms``. The shipped terms (:mod:`lightning_metakd.distill.terms`):

    - :class:`~lightning_metakd.distill.TaskLoss` — ``CE(student, query_y)``; for a MAML-family
      student ``L_task(θ − α∇θ L'_task(θ))`` (Finn et al. 2017);
    - :class:`~lightning_metakd.distill.SoftLabels` — ``T² KL(p_teacher^T ‖ p_student^T)``
      (Hinton et al. 2015);
    - :class:`~lightning_metakd.distill.FeatureHints` — FitNets hints with learned projectors
      (Romero et al. 2015), on the query forward pass after adaptation;
    - :class:`~lightning_metakd.distill.AttentionTransfer` — activation attention over the conv
      blocks (Zagoruyko & Komodakis 2017);
    - :class:`~lightning_metakd.distill.AttentionDistillation` — attention distillation
      ``L = L_task + λ Σ_l ‖A_target^l − A_meta^l‖_F²`` between ViTs;
    - :class:`~lightning_metakd.distill.ParameterAnchor` — ``λ‖θ − θ*‖²``: with the task loss,
      MAML-anchored distillation ``L = L_task(θ − α∇θ L'_task(θ)) + λ‖θ − θ*‖²``.

    Each term is logged as ``train/loss_<name>`` (already weighted, so they add up to
    ``train/loss``), with ``train/acc`` the student's query accuracy. Validation and test
    evaluate the student alone, like :class:`~lightning_metakd.modules.MetaLearnerModule`;
    :meth:`student_learner` hands it over as a standalone
    :class:`~lightning_metakd.algorithms.Learner`. A term of your own is a subclass of
    ``DistillationTerm`` in your project, named in YAML by its ``class_path``.

    The teachers adapt as they would at test time (``inner_steps_test`` steps), so their targets are
    their best predictions; they run only when some term needs them. They are frozen (no gradient,
    always in eval mode, outside the optimiser) and part of this module's ``state_dict``: a
    distilled checkpoint holds them, so it loads on its own with :meth:`load_from_checkpoint`
    even when their checkpoints are gone. The hyper-parameters record their paths, never objects.

    **θ*.** With ``init_from_teacher`` the student starts from the anchor teacher's θ* — copied
    when the architectures are equal, else sliced to the student's widths
    (:func:`~lightning_metakd.distill.slice_state`: the teacher's most important channels, heads
    or blocks by ``theta_star_selection``; a ProtoNet teacher's body for a MAML/ANIL student with a
    fresh head, and back) — and terms that need θ* (the anchor) get that state. Without it they
    get the teacher's state as is, when it fits the student.

    **Several teachers** (``teacher=[...]``, e.g. a MAML Conv4 and a ProtoNet ResNet12) all adapt
    on each task's support set; each term combines them with ``teacher_weights`` (equal by
    default; soft labels average tempered probabilities, feature terms sum one term per teacher).
    θ* comes from the one teacher ``anchor_teacher`` picks.

    Args:
        teacher: a :class:`~lightning_metakd.algorithms.Learner`, a ``MetaLearnerModule`` or the
            path of its checkpoint (a distillation checkpoint gives its student), or a list of
            them. A path is read lazily — in ``setup``, or at first use — so a config can name a
            teacher that is not trained yet; a missing or wrong file fails there, clearly.
        student_backbone: the student's feature extractor (``Conv4(hidden=16)``, a smaller ViT, ...).
        student_algorithm: the student's :class:`~lightning_metakd.algorithms.MetaAlgorithm`.
        ways: classes per training task (sizes a MAML-family head; must equal a head teacher's).
        terms: the terms of the objective; default ``[TaskLoss(), SoftLabels()]`` (weights 1,
            ``T = 4``). Names must be unique; a weight of 0 switches a term off.
        init_from_teacher: start the student from the anchor teacher's θ* (see above).
        theta_star_selection: which units of the teacher a narrower student keeps: ``"bn_gamma"``
            (the |γ| of each channel's BatchNorm, the best measured: +18.2 points over random
            channels with no training on Conv4-32 → Conv4-8, ``benchmarks/theta_star.py``),
            ``"l1"`` (filter norms, the rule of lightning-metakd 0.1), ``"random"``, or a rule
            object of :mod:`lightning_metakd.distill.transfer` (e.g. ``RandomChannels(seed=3)``,
            ``TaylorImportance(episodes, ProtoNet())``).
        teacher_weights: with several teachers, one weight ≥ 0 per teacher (normalised to sum to
            1; 0 leaves a teacher out); ``None``: equal weights.
        anchor_teacher: the index of the teacher whose θ* ``init_from_teacher`` and the terms use.
        normalization: the student's BatchNorm policy (as for ``MetaLearnerModule``); each teacher
            keeps its own (from its checkpoint).
        teacher_normalization: the teachers' BatchNorm policy during distillation. ``"auto"``
            (the default): when a Trainer fits this module, ``"population"`` (statistics of
            meta-training images, estimated at ``setup``) for every teacher whose outputs that
            makes per-image and so cacheable (a metric teacher no term taps, ``cache_teachers``
            on, training images not augmented); every other teacher, and every teacher outside
            ``fit``, keeps its own policy. With it a step costs about what the student's own
            step costs (``benchmarks/distill_step.py``). ``None``: each teacher its own policy
            always (the default of lightning-metakd 0.1: the teacher's exact test-time
            predictions as targets, at 2-4x the step time); ``"transductive"``, ``"support"``,
            ``"population"``: that policy for every teacher. A checkpoint records the policy
            the teachers were distilled with.
        cache_teachers: cache the per-image embeddings of metric teachers with population
            statistics (``distill/cache.py``): each training image is embedded once, then looked
            up — the same targets at a fraction of the cost. Off when the training images are
            augmented or a term taps the teacher.
        teacher_precision: ``"32"`` or ``"bf16"``: the frozen teachers' passes under bfloat16
            autocast (their targets scored in float32). The teachers' forward passes are most of
            a distillation step's cost; ``benchmarks/distill_step.py`` measures both.
        knowledge_epochs: train with every term for the first ``knowledge_epochs`` epochs, then
            with the task loss alone (early-stopped knowledge distillation, Cho & Hariharan 2019,
            "On the efficacy of knowledge distillation"): a small student takes the teacher's head
            start without being held, to the end, to a function it lacks the capacity to fit.
            After the stop the teachers no longer run, so a step costs the undistilled
            student's. ``None`` (default): every term for the whole run.
        vmap_tasks, task_chunk_size: as for ``MetaLearnerModule`` (the student's settings; the
            same per-task function runs in a loop or under ``torch.func.vmap``).
        optimizer, lr_scheduler, allow_tf32, tune_cpu_allocator: see
            :class:`~lightning_metakd.modules.episodic.EpisodicModule` (the optimiser sees the
            student and the terms' parameters, e.g. projectors).

    Example — a Conv4-16 ProtoNet student of a Conv4-64 teacher, θ* sliced, soft labels::

        distiller = DistillationModule("teacher.ckpt", Conv4(hidden=16), ProtoNet(), ways=20,
                                       terms=[TaskLoss(), SoftLabels(temperature=4)],
                                       init_from_teacher=True)
        L.Trainer(max_epochs=5).fit(distiller, datamodule)
        student = distiller.student_learner()   # a Learner, no teacher needed
        state = student.adapt(support_x, support_y)
    """

    checkpoint_kind = "distillation"
    learner_name = "student"

    def __init__(
        self,
        teacher: TeacherSource | list[TeacherSource],
        student_backbone: nn.Module,
        student_algorithm: MetaAlgorithm,
        ways: int = 5,
        terms: list[DistillationTerm] | None = None,
        init_from_teacher: bool = False,
        theta_star_selection: str | ChannelSelection = "bn_gamma",
        teacher_weights: list[float] | None = None,
        anchor_teacher: int = 0,
        normalization: str = "transductive",
        teacher_normalization: str | None = "auto",
        teacher_precision: str = "32",
        cache_teachers: bool = True,
        knowledge_epochs: int | None = None,
        vmap_tasks: bool | None = None,
        task_chunk_size: int | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        allow_tf32: bool = False,
        tune_cpu_allocator: bool = True,
    ) -> None:
        super().__init__(optimizer, lr_scheduler, allow_tf32, tune_cpu_allocator)
        terms = [TaskLoss(), SoftLabels()] if terms is None else list(terms)
        check_terms(terms)
        several = isinstance(teacher, list | tuple)
        sources = list(teacher) if several else [teacher]
        if not sources or not all(isinstance(t, TeacherSource | Path) for t in sources):
            got = [type(t).__name__ for t in sources] if several else type(teacher).__name__
            raise TypeError(
                f"teacher must be a Learner, a MetaLearnerModule or the path of its checkpoint, "
                f"or a non-empty list of them (several teachers), got {got}."
            )
        count = len(sources)
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
        self.selection = resolve_selection(theta_star_selection)  # unknown names fail here
        self.save_hyperparameters(
            ignore=["teacher", "student_backbone", "student_algorithm", "terms", "optimizer",
                    "lr_scheduler", "theta_star_selection"]
        )  # fmt: skip
        self.hparams["theta_star_selection"] = (
            theta_star_selection if isinstance(theta_star_selection, str) else repr(self.selection)
        )
        paths = [str(t) if isinstance(t, str | Path) else None for t in sources]
        self.hparams["teacher"] = paths if several else paths[0]
        self.num_teachers, self.anchor_teacher = count, anchor_teacher
        self.ways, self.init_from_teacher = ways, init_from_teacher
        if teacher_precision not in ("32", "bf16"):
            raise ValueError(
                f"teacher_precision must be '32' or 'bf16', got {teacher_precision!r}; bf16 runs the "
                "frozen teachers' forward passes under bfloat16 autocast (fast where the CPU or GPU "
                "has bfloat16 units; their outputs are scored in float32)."
            )
        self.teacher_precision = teacher_precision
        if knowledge_epochs is not None and (
            not isinstance(knowledge_epochs, int)
            or isinstance(knowledge_epochs, bool)
            or knowledge_epochs < 0
        ):
            raise ValueError(
                f"knowledge_epochs must be a whole number of epochs >= 0 (or null for every term "
                f"throughout), got {knowledge_epochs!r}."
            )
        self.knowledge_epochs = knowledge_epochs
        if teacher_normalization not in (None, AUTO, *POLICIES):
            raise ValueError(
                f"unknown normalization {teacher_normalization!r} for teacher_normalization; use "
                f"'auto' (the default), None (each teacher its own) or one of {list(POLICIES)}."
            )
        self.teacher_normalization = teacher_normalization
        self.cache_teachers = cache_teachers
        self._caches: list[TeacherCache | None] = []
        self._own_policies: list[str | None] = []  # where "auto" replaced a teacher's policy
        self.student = Learner(
            student_backbone, student_algorithm, ways, normalization, vmap_tasks, task_chunk_size
        )
        self.terms = nn.ModuleList(terms)
        self.teachers = nn.ModuleList()
        self._sources: list[TeacherSource | Path] = sources
        if not any(isinstance(t, str | Path) for t in sources):
            self.prepare()

    @property
    def learner(self) -> Learner:  # type: ignore[override]
        """The student: what is trained and evaluated."""
        return self.student

    # -- the teachers -----------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load the teachers given as paths, freeze them, set θ* and bind every term (once)."""
        if not self._sources:
            return
        teachers = [load_teacher(source) for source in self._sources]
        for k, teacher in enumerate(teachers):
            if teacher.algorithm.needs_head and teacher.ways != self.ways:
                raise ValueError(
                    f"the {self._who(k)}'s {type(teacher.algorithm).__name__} head is "
                    f"{teacher.ways}-way but this module trains {self.ways}-way tasks (ways="
                    f"{self.ways}); set ways={teacher.ways} and the data's ways to match, or use a "
                    f"teacher trained for {self.ways}-way tasks."
                )
        # Beside the student (a teacher trained on a GPU loads onto it); Lightning then moves the
        # whole module, teachers included, to the run's device.
        device = next(self.student.parameters()).device
        for teacher in teachers:
            if self.teacher_normalization not in (None, AUTO):
                teacher.normalization = self.teacher_normalization
        self.teachers = nn.ModuleList(t.requires_grad_(False).eval().to(device) for t in teachers)
        self._sources = []
        anchor = teachers[self.anchor_teacher]
        star = theta_star(
            anchor, self.student.model, self.selection, self.init_from_teacher,
            self.anchor_teacher, self.num_teachers,
        )  # fmt: skip
        for term in self.terms:
            term.bind(self.student, teachers, star)
        self._own_policies = [None] * len(teachers)
        self._caches = [
            TeacherCache.for_teacher(t) if self._cacheable(k, t) else None
            for k, t in enumerate(teachers)
        ]

    def _cacheable(self, k: int, teacher: Learner) -> bool:
        """Whether teacher ``k``'s outputs can be cached once they are per-image (under
        population statistics: :meth:`TeacherCache.for_teacher` checks that)."""
        tapped = any(term.teacher_paths(k) for term in self.terms)
        return self.cache_teachers and not teacher.algorithm.needs_head and not tapped

    def _who(self, k: int) -> str:
        return teacher_name(k, self.num_teachers)

    def teacher_ensemble(self) -> TeacherEnsemble:
        """The teachers as one learner (weights ``teacher_weights``), sharing their modules."""
        self.prepare()
        return TeacherEnsemble(list(self.teachers), self.teacher_weights)

    def student_learner(self) -> Learner:
        """The student as a standalone :class:`~lightning_metakd.algorithms.Learner` (a copy)."""
        self.prepare()  # with init_from_teacher, the student starts from θ*
        return copy.deepcopy(self.student)

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()  # frozen: dropout off, whatever the Trainer does to this module
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = getattr(self._trainer, "datamodule", None)
        train = getattr(data, "splits", {}).get("train") if data is not None else None
        # A fixed set of views per image (train_views) keeps outputs per-image: one row per view.
        augmented = (
            train is not None
            and train.transform is not None
            and getattr(train, "views", None) is None
        )
        if augmented and any(self._caches):
            rank_zero_info(
                "lightning-metakd: teacher outputs are not cached: the training images are "
                "augmented (a new view at every draw), so the teachers run on every task; "
                "data.init_args.train_views keeps a fixed set of views that can be cached."
            )
            self._caches = [None] * len(self._caches)
        elif (
            stage == "fit"
            and self.teacher_normalization == AUTO
            and train is not None
            and not augmented
        ):
            self._auto_normalization(data)
        calibrate_teachers(list(self.teachers), data, self.device)

    def _auto_normalization(self, data: Any) -> None:
        """``teacher_normalization="auto"``: population statistics (estimated next, from
        ``data``) for every teacher they make cacheable; the others keep their own policy."""
        if not hasattr(data, "calibration_images"):
            return
        for k, teacher in enumerate(self.teachers):
            if teacher.normalization != "population" and self._cacheable(k, teacher):
                self._use_population(k)

    def _use_population(self, k: int) -> None:
        """Teacher ``k`` normalises with population statistics from now on (``"auto"``); its own
        policy is kept for the checkpoint's record."""
        teacher = self.teachers[k]
        self._own_policies[k] = teacher.normalization
        teacher.normalization = "population"  # its buffers, before a checkpoint's estimates
        self._caches[k] = TeacherCache.for_teacher(teacher)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint of an ``"auto"`` fit holds the population statistics that fit gave its
        teachers: outside fit (``metakd validate/test --ckpt_path``) the teachers take them again."""
        super().on_load_checkpoint(checkpoint)
        self.prepare()
        if self.teacher_normalization != AUTO:
            return
        keys = checkpoint.get("state_dict", {})
        for k, teacher in enumerate(self.teachers):
            prefix = f"teachers.{k}.population."
            if teacher.normalization != "population" and any(
                key.startswith(prefix) for key in keys
            ):
                self._use_population(k)

    def check_data(self, stage: str) -> None:
        data = getattr(self._trainer, "datamodule", None)
        if data is not None and stage == "fit":
            for k, teacher in enumerate(self.teachers):  # teachers see training episodes only
                teacher.check_data(data, stage, self._who(k), ("ways",))
        super().check_data(stage)

    # -- the method -------------------------------------------------------------------------------
    def knowledge_on(self) -> bool:
        """Whether the knowledge terms (all but :class:`~lightning_metakd.distill.TaskLoss`) are
        in the objective now: always, or before epoch ``knowledge_epochs``."""
        return self.knowledge_epochs is None or self.current_epoch < self.knowledge_epochs

    def _on(self, term: DistillationTerm) -> bool:
        """Whether ``term`` is in the objective now (a weight, and not stopped)."""
        return bool(term.weight) and (isinstance(term, TaskLoss) or self.knowledge_on())

    def _needs_teachers(self) -> bool:
        return any(self._on(t) and t.per_task and t.needs_teachers for t in self.terms)

    def task_context(
        self,
        student_params: Params,
        teacher_params: Sequence[Params],
        support_x: Tensor,
        support_y: Tensor,
        query_x: Tensor,
        query_y: Tensor,
        ways: int,
        training: bool,
        support_index: Tensor | None = None,
        query_index: Tensor | None = None,
        lookups: Sequence[nn.Module | None] = (),
    ) -> TaskContext:
        """Adapt the teachers (if needed, without gradients) and the student on ONE task; score the
        queries with every term's taps recorded: what the per-task terms read."""
        student, on = self.student, [t for t in self.terms if self._on(t)]
        t_states, t_logits, t_taps = [], [], []
        if self._needs_teachers():
            t_states, t_logits, t_taps = teachers_on_task(
                list(self.teachers), teacher_params, support_x, support_y, query_x, ways,
                lambda k: [p for term in on for p in term.teacher_paths(k)],
                self.teacher_precision == "bf16", lookups, support_index, query_index,
            )  # fmt: skip
        algorithm, model = student.algorithm, student.model
        task = algorithm.adapt_task(
            model, student_params, support_x, support_y, ways, training,
            student.policy(training=training),
        )  # fmt: skip
        with tap(model, [p for term in on for p in term.student_paths()]) as s_taps:
            logits = algorithm.predict_task(model, student_params, task, query_x, ways)
        s_state = task.state
        return TaskContext(
            support_x, support_y, query_x, query_y, ways, training, student, student_params,
            s_state, logits, dict(s_taps), list(self.teachers), self.teacher_weights, t_states,
            t_logits, t_taps,
        )  # fmt: skip

    def episode_loss(self, batch: Episode, training: bool = True) -> EpisodeLoss:
        """The distillation objective of an episode, each weighted term, the student's accuracy.

        Per-task terms are averaged over the ``T`` tasks; per-step terms (the anchor, a function
        of θ alone) are added once. ``loss == sum(terms.values())``.
        """
        self.prepare()
        self.student.check_episode(batch, "student")
        if self._needs_teachers():
            for k, teacher in enumerate(self.teachers):
                teacher.check_episode(batch, self._who(k))
        s_params = self.student.params()
        t_params = [teacher.params(detach=True) for teacher in self.teachers]
        per_task = [t for t in self.terms if self._on(t) and t.per_task]
        lookups = self._fill_caches(batch) if training and self._needs_teachers() else []
        tensors = [batch.support_x, batch.support_y, batch.query_x, batch.query_y]
        if lookups:
            tensors += [batch.support_index, batch.query_index]

        def one_task(sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, *index: Tensor):
            ctx = self.task_context(
                s_params, t_params, sx, sy, qx, qy, batch.ways, training, *index, lookups=lookups
            )
            return ctx.student_logits, {t.name: t.weight * t(ctx) for t in per_task}

        logits, values = map_tasks(
            one_task,
            tensors,
            vmap_tasks=self.student.vmap_tasks,
            chunk_size=self.student.task_chunk_size,
            algorithms=[self.student.algorithm],
        )
        terms = {name: value.mean() for name, value in values.items()}
        step = StepContext(self.student, s_params, list(self.teachers))
        for term in self.terms:
            if self._on(term) and not term.per_task:
                terms[term.name] = term.weight * term(step)
        loss = torch.stack(list(terms.values())).sum()
        accuracy = (logits.argmax(-1) == batch.query_y).float().mean(1)
        return EpisodeLoss(loss, accuracy, logits, terms)

    def _fill_caches(self, batch: Episode) -> list[nn.Module | None]:
        """Cached teachers' lookups for ``batch`` (their missing images embedded now), or ``[]``
        when no teacher is cached or the episode does not carry sample indices."""
        if not any(self._caches) or batch.support_index is None or batch.query_index is None:
            return []
        images = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        indices = torch.cat([batch.support_index.flatten(), batch.query_index.flatten()])
        lookups: list[nn.Module | None] = []
        for teacher, cache in zip(self.teachers, self._caches, strict=True):
            if cache is None:
                lookups.append(None)
                continue
            cache.fill(teacher, images, indices, bf16=self.teacher_precision == "bf16")
            lookups.append(cache.lookup())
        return lookups

    # -- checkpoints ------------------------------------------------------------------------------
    def components(self) -> dict[str, Any]:
        self.prepare()
        return {
            "kind": self.checkpoint_kind,
            "module": f"{type(self).__module__}.{type(self).__qualname__}",
            "student": self.student.components(),
            "teachers": [
                teacher.components() | ({"own_normalization": own} if own else {})
                for teacher, own in zip(self.teachers, self._own_policies, strict=True)
            ],  # a teacher "auto" normalised otherwise also records its own policy
            "terms": [component_spec(term) for term in self.terms],
        }


__all__ = ["DistillationModule"]
