"""Learner: a backbone, an algorithm and a task shape — the thing that adapts to new tasks.

Everything that meta-trains, distils, evaluates, reports, fine-tunes or exports works on a
:class:`Learner`: a plain ``nn.Module`` with no Lightning inside. The LightningModules wire one to a
``Trainer`` (``MetaLearnerModule.learner``, ``DistillationModule.student`` and its teachers); the
report measures learners; deployment folds a learner's adapted state into a fixed classifier.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_metakd.algorithms.base import MetaAlgorithm
from lightning_metakd.algorithms.inner_loop import Params
from lightning_metakd.algorithms.normalization import (
    TRANSDUCTIVE,
    Normalization,
    Statistics,
    TaskState,
    batch_norm_statistics,
    check_policy,
    freeze_batch_norm,
    prepare_model,
)
from lightning_metakd.data.episode import Episode
from lightning_metakd.models.classifier import Classifier
from lightning_metakd.spec import build_component, component_spec


class EpisodeLoss(NamedTuple):
    """An episode's objective, its named parts, and the learner's query predictions."""

    loss: Tensor  #: the objective (scalar): mean query cross-entropy, or the distillation sum
    accuracy: Tensor  #: query accuracy of each task, ``[T]``
    logits: Tensor  #: query logits, ``[T, N*Q, N]``
    terms: dict[str, Tensor] = {}  #: weighted parts of ``loss`` by name (distillation terms)


def scored(logits: Tensor) -> Tensor:
    """Half-precision logits are scored in float32; float32 and float64 stay as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


class Learner(nn.Module):
    """``backbone`` + ``algorithm`` for ``ways``-way tasks: adapt on a support set, predict queries.

    The adapted network is :attr:`model`: ``Classifier(backbone, ways)`` for algorithms with a
    head (MAML, ANIL, Meta-SGD), the bare backbone for metric ones (ProtoNet, MatchingNet). Its
    parameters θ are the meta-learned initialisation — θ* once trained. The algorithm's own
    meta-parameters (Meta-SGD's learning rates) are built here, once.

    Args:
        backbone: a feature extractor with a ``num_features`` attribute (``Conv4``, ``ResNet12``, ...).
        algorithm: a :class:`~lightning_metakd.algorithms.MetaAlgorithm`.
        ways: classes per task; sizes the head of MAML-family algorithms (metric algorithms take
            any number of classes).
        normalization: the BatchNorm policy of its episodes — training, validation, test
            (:data:`~lightning_metakd.algorithms.normalization.POLICIES`): ``"transductive"``
            (each batch its own statistics, the papers' protocol and the default), ``"support"``
            (the support set's statistics for every query) or ``"population"`` (meta-training
            statistics, :meth:`calibrate`). :meth:`adapt` / :meth:`predict` on user data never
            use transductive statistics unless asked: a query's answer must not depend on the
            other images in its batch, so they follow ``"support"`` when this is transductive.
        vmap_tasks: how the tasks of an episode are processed: ``torch.func.vmap`` (``True``), a
            loop (``False``), or the loop on CPU and vmap elsewhere (``None``;
            :func:`~lightning_metakd.algorithms.engine.use_vmap`).
        task_chunk_size: with vmap, tasks per vectorised chunk (bounds memory).

    Example — adapt to a brand-new task and label its queries::

        learner = load_learner("runs/kanji-protonet/version_0/checkpoints/best.ckpt")
        state = learner.adapt(support_x, support_y)       # [N*K, C, H, W], [N*K] in 0..N-1
        predicted = learner.predict(state, query_x).argmax(-1)
    """

    def __init__(
        self,
        backbone: nn.Module,
        algorithm: MetaAlgorithm,
        ways: int = 5,
        normalization: str = "transductive",
        vmap_tasks: bool | None = None,
        task_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(ways, int) or isinstance(ways, bool) or ways < 2:
            raise ValueError(f"ways must be at least 2, got {ways}.")
        if not isinstance(algorithm, MetaAlgorithm):
            raise TypeError(
                f"algorithm must be a MetaAlgorithm (MAML, ANIL, MetaSGD, ProtoNet, MatchingNet, "
                f"...), got {type(algorithm).__name__}."
            )
        if task_chunk_size is not None and task_chunk_size < 1:
            raise ValueError(f"task_chunk_size must be at least 1, got {task_chunk_size}.")
        backbone = prepare_model(backbone)
        self.model: nn.Module = Classifier(backbone, ways) if algorithm.needs_head else backbone
        self.algorithm = algorithm
        self.ways = ways
        self.vmap_tasks, self.task_chunk_size = vmap_tasks, task_chunk_size
        algorithm.build(self.model)
        self.normalization = normalization  # population: its buffers, before a checkpoint's state
        if vmap_tasks:
            algorithm.check_vmap()  # e.g. MAML(checkpoint_steps=True) needs the loop

    @property
    def normalization(self) -> str:
        """The BatchNorm policy of this learner's episodes (see the constructor). Setting it to
        ``"population"`` makes the buffers of the population statistics (not yet estimated:
        :meth:`calibrate`), so a checkpoint's estimates can be loaded into them."""
        return self._normalization

    @normalization.setter
    def normalization(self, policy: str) -> None:
        self._normalization = check_policy(policy)
        if policy == "population":
            self._population_buffers()

    @property
    def backbone(self) -> nn.Module:
        """The feature extractor (inside :attr:`model`)."""
        return self.model.backbone if isinstance(self.model, Classifier) else self.model

    # -- description ------------------------------------------------------------------------------
    def components(self) -> dict[str, Any]:
        """``{"backbone": spec, "algorithm": spec, "ways": N}``: what rebuilds this learner.

        Specs are ``class_path``/``init_args`` dicts (:func:`~lightning_metakd.spec.
        component_spec`), so a checkpoint holding them loads with ``weights_only=True``.
        """
        return {
            "backbone": component_spec(self.backbone),
            "algorithm": component_spec(self.algorithm),
            "ways": self.ways,
            "normalization": self.normalization,
        }

    @classmethod
    def from_components(cls, components: Mapping[str, Any], **settings: Any) -> Learner:
        """A freshly initialised learner from :meth:`components` (load its state dict next)."""
        settings.setdefault("normalization", components.get("normalization", "transductive"))
        return cls(
            build_component(components["backbone"]),
            build_component(components["algorithm"]),
            components["ways"],
            **settings,
        )

    def params(self, detach: bool = False) -> Params:
        """``{name: tensor}`` of :attr:`model`'s parameters (detached with ``detach=True``)."""
        return {k: v.detach() if detach else v for k, v in self.model.named_parameters()}

    def theta_star(self) -> dict[str, Tensor]:
        """The meta-learned initial parameters θ* of :attr:`model` (detached copies)."""
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    # -- normalisation ----------------------------------------------------------------------------
    def _batch_norms(self) -> list[tuple[str, nn.Module]]:
        return [
            (n, m)
            for n, m in self.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]

    def _population_buffers(self) -> None:
        """Buffers (so checkpoints keep them) for every BatchNorm's population mean and variance,
        and whether they were estimated yet; made once, for population learners only."""
        if hasattr(self, "population"):
            return
        weight = next(self.parameters())
        self.population = nn.Module()
        for name, bn in self._batch_norms():
            key = name.replace(".", "__")
            for stat, value in (("mean", 0.0), ("var", 1.0)):
                full = torch.full((bn.num_features,), value, device=weight.device)
                self.population.register_buffer(f"{key}__{stat}", full)
        self.register_buffer("calibrated", torch.tensor(False, device=weight.device))

    def population_statistics(self) -> Statistics:
        """``{BatchNorm path: (mean, var)}`` estimated by :meth:`calibrate` (raises before)."""
        if not bool(getattr(self, "calibrated", False)):
            raise RuntimeError(
                "this learner has no population statistics yet: call learner.calibrate(images) "
                "with meta-training images (the modules do it at validation and test when "
                "normalization='population'), or use normalization='support'."
            )
        store = self.population
        return {
            n: (
                getattr(store, f"{n.replace('.', '__')}__mean"),
                getattr(store, f"{n.replace('.', '__')}__var"),
            )
            for n, _ in self._batch_norms()
        }

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor]) -> Learner:
        """Estimate the population statistics of every BatchNorm from meta-training images.

        Each tensor of ``batches`` is one batch ``[B, C, H, W]`` as training normalises it (a
        task's support or query set); per layer the statistics of all batches are pooled: the
        mean of their means and, by the law of total variance, the mean of their variances plus
        the variance of their means, weighted by batch size. Returns ``self``.
        """
        self._population_buffers()
        sums: dict[str, list[Tensor]] = {}
        count = 0
        with torch.inference_mode(False):
            for images in batches:
                with batch_norm_statistics(self.model) as record:
                    self.model(images.clone())
                weight = len(images)
                for name, (mean, var) in record.recorded.items():
                    moments = [weight * mean, weight * (var + mean.pow(2))]
                    sums[name] = (
                        moments
                        if name not in sums
                        else [a + b for a, b in zip(sums[name], moments, strict=True)]
                    )
                count += weight
        if not count:
            raise ValueError("calibrate needs at least one batch of images.")
        for name, (first, second) in sums.items():
            key = name.replace(".", "__")
            mean = first / count
            getattr(self.population, f"{key}__mean").copy_(mean)
            getattr(self.population, f"{key}__var").copy_(second / count - mean.pow(2))
        self.calibrated.fill_(True)
        return self

    def policy(self, normalization: str | None = None, training: bool = False) -> Normalization:
        """The :class:`~lightning_metakd.algorithms.base.Normalization` an episode or a task uses.

        ``normalization`` overrides this learner's policy; population statistics in training
        are batch statistics (BatchNorm trains that way).
        """
        name = check_policy(normalization or self.normalization)
        if name == "population" and not training:
            return Normalization(name, self.population_statistics())
        return TRANSDUCTIVE if name == "population" else Normalization(name)

    # -- the method -------------------------------------------------------------------------------
    def episode_logits(
        self, batch: Episode, training: bool = True, params: Params | None = None
    ) -> Tensor:
        """Query logits ``[T, N*Q, N]`` of every task of ``batch``, each adapted on its support set."""
        self.check_episode(batch)
        return self.algorithm.episode_logits(
            self.model,
            self.params() if params is None else params,
            batch.support_x,
            batch.support_y,
            batch.query_x,
            batch.ways,
            training,
            vmap_tasks=self.vmap_tasks,
            chunk_size=self.task_chunk_size,
            normalization=self.policy(training=training),
        )

    def episode_loss(self, batch: Episode, training: bool = True) -> EpisodeLoss:
        """Mean query cross-entropy of an episode after adaptation, and per-task accuracy.

        ``L = mean_t L_task(f_{θ'_t}(query_x_t), query_y_t)``, ``θ'_t`` adapted on task ``t``'s
        support set (for a MAML-family learner ``L_task(θ − α∇θ L'_task(θ))``, Finn et al. 2017;
        for metric learners the support set defines the classifier).
        """
        logits = self.episode_logits(batch, training)
        loss = F.cross_entropy(scored(logits).flatten(0, 1), batch.query_y.flatten())
        accuracy = (logits.argmax(-1) == batch.query_y).float().mean(1)
        return EpisodeLoss(loss, accuracy, logits)

    def evaluate(self, batch: Episode) -> EpisodeLoss:
        """:meth:`episode_loss` in evaluation (``inner_steps_test``), usable anywhere, no graph kept.

        Adaptation needs gradients even when the caller runs in inference mode (a ``Trainer``'s
        evaluation loop); tensors made there are cloned so autograd may use them.
        """
        with torch.inference_mode(False), torch.no_grad():
            return self.episode_loss(batch.clone(), training=False)

    def adapt(
        self, support_x: Tensor, support_y: Tensor, normalization: str | None = None
    ) -> TaskState:
        """Adapt to one task's support set ``[N*K, C, H, W]``, labels ``[N*K]`` in ``0..N-1``.

        Returns the task state (adapted parameters θ', prototypes or the support embedding, and
        the BatchNorm statistics the queries will use) for :meth:`predict`. ``normalization``:
        the policy; default this learner's, except that transductive becomes ``"support"``, so a
        query's answer never depends on the other queries it is predicted with (pass
        ``"transductive"`` for the papers' protocol). The inputs are checked: every label
        ``0..N-1`` present, images that fit the backbone, as many labels as images.
        """
        ways = self.check_support(support_x, support_y)
        if normalization is None:
            normalization = "support" if self.normalization == "transductive" else None
        with torch.inference_mode(False), torch.no_grad():
            return self.algorithm.adapt_task(
                self.model,
                self.params(detach=True),
                support_x.clone(),
                support_y.clone(),
                ways,
                training=False,
                normalization=self.policy(normalization),
            )

    def predict(self, task: TaskState, query_x: Tensor) -> Tensor:
        """Logits ``[M, N]`` for query images ``[M, C, H, W]`` of the task behind ``task``."""
        if not isinstance(task, TaskState):
            raise TypeError(
                f"predict takes the TaskState that learner.adapt returned, got {type(task).__name__}."
            )
        self.check_images(query_x, "query_x")
        with torch.inference_mode(False), torch.no_grad():
            return self.algorithm.predict_task(
                self.model, self.params(detach=True), task, query_x.clone(), self.ways
            )

    def fold(
        self, support_x: Tensor, support_y: Tensor, normalization: str | None = None
    ) -> nn.Module:
        """Adapt once on a support set and fold the result into a plain module ``images -> logits``.

        :meth:`MetaAlgorithm.fold <lightning_metakd.algorithms.MetaAlgorithm.fold>` of the
        adapted state; with a policy that fixes statistics (support, population; the default, as
        for :meth:`adapt`) every BatchNorm of the folded module keeps them as running statistics,
        so it classifies each image on its own. This learner is not modified.
        """
        was_training = self.training
        self.eval()
        try:
            task = self.adapt(support_x, support_y, normalization)
        finally:
            self.train(was_training)
        model = copy.deepcopy(self.model)
        if task.statistics is not None:
            freeze_batch_norm(model, task.statistics)
        return self.algorithm.fold(model, task.state)

    # -- checks -----------------------------------------------------------------------------------
    def check_images(self, images: Tensor, name: str = "images") -> None:
        """Raise a clear error unless ``images`` is ``[B, C, H, W]`` that the backbone takes."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{name} must be a batch of images [B, C, H, W], got {shape}.")
        self._check_image_shape(tuple(images.shape[1:]), name)

    def _check_image_shape(self, shape: tuple[int, ...], what: str) -> None:
        channels = getattr(self.backbone, "in_channels", None)
        if channels is not None and shape[0] != channels:
            raise ValueError(
                f"The backbone expects {channels}-channel images but {what} has {shape[0]}; "
                f"convert the images (e.g. to {'grey' if channels == 1 else 'RGB'}) or use a "
                f"backbone built with in_channels={shape[0]}."
            )
        size = getattr(self.backbone, "image_size", None)
        if size is not None and tuple(shape[-2:]) != (size, size):
            raise ValueError(
                f"The backbone was built for {size}x{size} images but {what} has "
                f"{tuple(shape[-2:])}; resize the images, or set the data's image_size and the "
                "backbone's image_size to the same value."
            )

    def check_support(self, support_x: Tensor, support_y: Tensor) -> int:
        """Check one task's support set for :meth:`adapt`; returns its number of classes N."""
        self.check_images(support_x, "support_x")
        if not isinstance(support_y, Tensor) or support_y.dim() != 1:
            got = tuple(support_y.shape) if isinstance(support_y, Tensor) else support_y
            raise ValueError(f"support_y must be a 1-d tensor of labels [N*K], got {got}.")
        if len(support_y) != len(support_x):
            raise ValueError(
                f"support_x holds {len(support_x)} images but support_y {len(support_y)} labels; "
                "give one label per support image."
            )
        if support_y.dtype.is_floating_point or support_y.dtype == torch.bool:
            raise ValueError(f"support_y must hold integer labels, got dtype {support_y.dtype}.")
        labels = sorted(set(support_y.tolist()))
        ways = len(labels)
        if labels != list(range(ways)):
            raise ValueError(
                f"support_y must hold the labels 0..N-1, each at least once; got {labels[:12]}"
                f"{' ...' if len(labels) > 12 else ''}. Remap them first, e.g. "
                "`support_y = torch.unique(support_y, return_inverse=True)[1]`."
            )
        if ways < 2:
            raise ValueError("a task needs at least 2 classes; support_y holds only label 0.")
        if self.algorithm.needs_head and ways != self.ways:
            raise ValueError(
                f"This {type(self.algorithm).__name__} learner has a {self.ways}-way head but the "
                f"support set has {ways} classes; give it {self.ways} classes, or use a learner "
                f"meta-trained with ways={ways} (ProtoNet and MatchingNet take any number)."
            )
        return ways

    def check_episode(self, batch: Episode, who: str = "learner") -> None:
        """Raise a clear error when an episode's shape does not fit this learner (shape checks only)."""
        if self.algorithm.needs_head and batch.ways != self.ways:
            raise ValueError(
                f"The {who}'s {type(self.algorithm).__name__} head is {self.ways}-way but the "
                f"episode is {batch.ways}-way; set the data's (test_)ways to {self.ways} or build "
                f"the {who} with ways={batch.ways}."
            )
        self._check_image_shape(tuple(batch.support_x.shape[2:]), f"the episode ({who})")

    def check_data(
        self, datamodule: Any, stage: str, who: str = "learner", settings: tuple[str, ...] = ()
    ) -> None:
        """Fail before any step when ``datamodule`` cannot feed this learner.

        Compares a MAML-family head with the data's ``settings`` (e.g. ``("ways", "test_ways")``)
        and the backbone's ``image_size`` and ``in_channels`` with the data's, naming the setting
        to change. Data modules without these attributes pass.
        """
        for setting in settings:
            ways = getattr(datamodule, setting, None)
            if self.algorithm.needs_head and isinstance(ways, int) and ways != self.ways:
                raise ValueError(
                    f"The {who}'s {type(self.algorithm).__name__} head is {self.ways}-way but the "
                    f"data module has {setting}={ways}; set the data's {setting} to {self.ways}, "
                    f"or use a {who} built with ways={ways}."
                )
        size = getattr(self.backbone, "image_size", None)
        data_size = getattr(datamodule, "image_size", None)
        if isinstance(size, int) and isinstance(data_size, int) and size != data_size:
            raise ValueError(
                f"The {who}'s backbone was built for {size}x{size} images but the data module has "
                f"image_size={data_size}; set the data's image_size to {size}, or use a {who} "
                f"built with image_size={data_size}."
            )
        channels = getattr(self.backbone, "in_channels", None)
        data_channels = datamodule.channels if getattr(datamodule, "splits", None) else None
        if (
            isinstance(channels, int)
            and isinstance(data_channels, int)
            and channels != data_channels
        ):
            raise ValueError(
                f"The {who}'s backbone expects {channels}-channel images but the data has "
                f"{data_channels}; set the backbone's in_channels to {data_channels}, or use a "
                f"{who} built for {data_channels}-channel images."
            )

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, normalization={self.normalization!r}, "
            f"vmap_tasks={self.vmap_tasks}, task_chunk_size={self.task_chunk_size}"
        )


__all__ = ["EpisodeLoss", "Learner", "scored"]
