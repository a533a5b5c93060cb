"""FixedClassifier: a meta-learner adapted once to a user's classes, frozen into a plain module.

After meta-training (and distillation) a learner adapts to any N-way task from a few labelled
images. To deploy it on one fixed set of classes, the adaptation is done once and folded into an
ordinary ``nn.Module`` whose ``forward`` maps images to logits, with no support set at prediction
time:

- MAML, ANIL, Meta-SGD: the adapted parameters θ' are copied into the backbone and its linear head
  (a :class:`~lightning_metakd.models.classifier.Classifier`).
- ProtoNet: the prototypes become a layer, :class:`~lightning_metakd.algorithms.PrototypeClassifier`.
- MatchingNet: the normalised support embeddings and their labels become a layer,
  :class:`~lightning_metakd.algorithms.MatchingClassifier`.

Each algorithm says how it folds its own state (:meth:`MetaAlgorithm.fold
<lightning_metakd.algorithms.MetaAlgorithm.fold>`), so a new algorithm touches only its own file.

The file written by :meth:`FixedClassifier.save` holds only plain values and tensors (the network
as a ``class_path``/``init_args`` spec, its state dict, the class names and the input format), so it
loads with ``torch.load(weights_only=True)``: no pickled code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_metakd.algorithms import (
    Learner,
    MatchingClassifier,
    PrototypeClassifier,
    batch_norm_statistics,
    freeze_batch_norm,
    prepare_model,
)
from lightning_metakd.algorithms.normalization import Statistics
from lightning_metakd.data.dataset import ClassDataset
from lightning_metakd.spec import build_component, component_spec

#: The ``format`` entry of a saved classifier file, and its layout version.
FORMAT = "lightning_metakd.FixedClassifier"
FORMAT_VERSION = 1
#: Where BatchNorm layers take their statistics from (see :class:`FixedClassifier`).
STATISTICS = ("batch", "fixed")


def normalize_images(
    images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> Tensor:
    """``(images − mean) / std`` per channel of ``[B, C, H, W]`` images; unchanged when ``mean`` is None."""
    if mean is None or std is None:
        return images
    shape = (1, -1, 1, 1)
    return (images - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def read_image_files(
    paths: Sequence[str | Path],
    image_size: int,
    channels: int,
    invert: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Tensor:
    """Image files as a float batch ``[B, channels, image_size, image_size]``.

    The data pipeline's own loader (:meth:`~lightning_metakd.data.ClassDataset.load_image`) reads,
    scales to ``[0, 1]``, converts, inverts and resizes; ``mean``/``std`` then normalise as the
    split's transform did (:func:`normalize_images`). Used by :meth:`FixedClassifier.read_images`
    and by :mod:`~lightning_metakd.deploy.predict` for exported models.
    """
    missing = [str(p) for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"No such image file(s): {', '.join(missing)}.")
    dataset = ClassDataset(
        [Path(p) for p in paths],
        [0] * len(paths),
        ["images"],
        image_size=image_size,
        channels=channels,
        invert=invert,
    )
    images = torch.stack([dataset.load_image(i) for i in range(len(paths))])
    return normalize_images(images, mean, std)


def _batch_norms(network: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    return [
        (name, m)
        for name, m in network.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]


def image_statistics(network: nn.Module, images: Tensor) -> Statistics:
    """Mean and biased variance of each BatchNorm's input when ``network`` sees ``images`` at once.

    With these frozen in (:func:`~lightning_metakd.algorithms.freeze_batch_norm`), ``network``
    gives on ``images`` exactly what batch statistics give.
    """
    with torch.inference_mode(False), torch.no_grad(), batch_norm_statistics(network) as record:
        network(images.clone())
    return record.recorded


class FixedClassifier(nn.Module):
    """A classifier for a fixed list of classes: images ``[B, C, H, W]`` → logits ``[B, N]``.

    Built from a meta-learner by :meth:`from_learner` (adapt once on labelled images, fold the
    result in), fine-tuned further by :func:`~lightning_metakd.deploy.finetune`, written with
    :meth:`save` and read back with :meth:`load`. Column ``k`` of the logits is ``class_names[k]``.

    Input format: what the data modules feed the learner — float images in ``[0, 1]``, ``channels``
    channels, ``image_size`` pixels square, inverted (``1 − x``) first when ``invert``, then
    ``(x − mean) / std`` per channel when ``mean``/``std`` are set (mini-ImageNet's ``normalize``).
    :meth:`read_images` turns image files into such a batch.

    BatchNorm: the library's learners normalise each batch with its own statistics (transductive,
    see :func:`~lightning_metakd.algorithms.prepare_model`), so a query's logits depend on the other
    images of its batch. ``statistics="batch"`` keeps that behaviour: the logits equal the learner's
    own query logits after adapting on the same images. :meth:`fix_statistics` freezes the
    statistics of given images (the labelled ones, in :func:`~lightning_metakd.deploy.finetune`)
    into every BatchNorm instead (``statistics="fixed"``): each image is then classified on its own,
    whatever else is in the batch, which is what a deployed classifier needs.

    Args:
        network: a module mapping images to ``[B, len(class_names)]`` logits whose constructor
            arguments are stored on it (a ``Classifier``, :class:`PrototypeClassifier` or
            :class:`MatchingClassifier` around a library backbone), so :meth:`save` can describe it.
        class_names: the name of each output column.
        image_size: side length of the input images.
        channels: channels of the input images (1 grey, 3 RGB).
        invert: whether images are inverted (``1 − x``) when read, as ``FolderDataModule(invert=True)``.
        mean, std: the per-channel normalisation applied after reading (``None``: none).

    Example::

        classifier = FixedClassifier.from_learner(learner, support_x, support_y, ["cat", "dog"])
        classifier.fix_statistics(support_x)
        classifier.save("classifier.pt")
        logits = FixedClassifier.load("classifier.pt")(images)   # [B, 2]
    """

    def __init__(
        self,
        network: nn.Module,
        class_names: Sequence[str],
        image_size: int,
        channels: int,
        invert: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        names = [str(n) for n in class_names]
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(
                f"class_names must name at least 2 distinct classes, got {names[:5]}"
                f"{' ...' if len(names) > 5 else ''}."
            )
        ways = getattr(network, "ways", None)
        if ways is not None and ways != len(names):
            raise ValueError(
                f"the network has {ways} outputs but {len(names)} class names were given."
            )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels}.")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std (or neither).")
        for key, values in (("mean", mean), ("std", std)):
            if values is not None and len(values) != channels:
                raise ValueError(f"{key} needs {channels} values (one per channel), got {values}.")
        if std is not None and min(std) <= 0:
            raise ValueError(f"std must be positive, got {list(std)}.")
        self.mean = None if mean is None else [float(v) for v in mean]
        self.std = None if std is None else [float(v) for v in std]
        self.network = prepare_model(network)
        self.class_names, self.image_size, self.channels = names, int(image_size), int(channels)
        self.invert = bool(invert)
        self.statistics = "batch"
        self.eval()

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def from_learner(
        cls,
        learner: Learner,
        support_x: Tensor,
        support_y: Tensor,
        class_names: Sequence[str],
        invert: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> FixedClassifier:
        """Adapt ``learner`` on ``support_x [S, C, H, W]``, ``support_y [S]`` and fold the result in.

        ``support_y`` labels lie in ``0..N-1`` with ``N = len(class_names)``, every class at least
        once (any number of images per class); ``invert``, ``mean`` and ``std`` record how the
        images were prepared (see the class docstring). The learner adapts as in evaluation
        (``inner_steps_test`` steps, no dropout) and folds its state with
        :meth:`Learner.fold <lightning_metakd.algorithms.Learner.fold>`; it is not modified. In
        batch statistics, the returned classifier's logits on any query batch equal
        ``learner.predict(state, query_x)``.
        """
        ways = len(class_names)
        if support_x.dim() != 4 or support_y.dim() != 1 or len(support_x) != len(support_y):
            raise ValueError(
                "from_learner expects support_x [S, C, H, W] and support_y [S], got "
                f"{tuple(support_x.shape)} and {tuple(support_y.shape)}."
            )
        counts = torch.bincount(support_y.long().cpu(), minlength=ways)
        if len(counts) > ways or int(counts.min()) == 0:
            missing = [class_names[k] for k in range(ways) if counts[k] == 0]
            raise ValueError(
                f"support_y must hold every label 0..{ways - 1} (one per class name); classes "
                f"without an image: {missing[:5]}, labels seen: {sorted(set(support_y.tolist()))[:10]}."
            )
        algorithm = learner.algorithm
        if algorithm.needs_head and learner.ways != ways:
            raise ValueError(
                f"This {type(algorithm).__name__} learner has a {learner.ways}-way head, so it makes "
                f"classifiers for exactly {learner.ways} classes, but {ways} were given. Use "
                f"{learner.ways} class folders, or a learner meta-trained with ways={ways} (or a "
                "ProtoNet/MatchingNet learner, which handles any number of classes)."
            )
        if support_x.shape[-1] != support_x.shape[-2]:
            raise ValueError(f"images must be square, got {tuple(support_x.shape[-2:])}.")
        network = learner.fold(support_x, support_y, normalization="transductive")
        network.to(support_x.device).requires_grad_(True)
        return cls(network, class_names, support_x.shape[-1], support_x.shape[1], invert, mean, std)

    def fix_statistics(self, images: Tensor) -> FixedClassifier:
        """Freeze the BatchNorm statistics of ``images [M, C, H, W]`` into the network; returns self.

        Afterwards every image is normalised with these statistics, alone or in any batch; on
        ``images`` themselves the logits are unchanged. A network without BatchNorm is unaffected.
        """
        if self.statistics == "fixed":
            raise RuntimeError("the BatchNorm statistics of this classifier are already fixed.")
        self.check_images(images)
        freeze_batch_norm(self.network, image_statistics(self.network, images))
        self.statistics = "fixed"
        return self

    # -- using ------------------------------------------------------------------------------------
    def check_images(self, images: Tensor) -> None:
        """Raise a clear error when ``images`` is not a ``[B, channels, image_size, image_size]`` batch."""
        expected = (self.channels, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"this classifier takes images [B, {self.channels}, {self.image_size}, "
                f"{self.image_size}], got {tuple(images.shape)}; read files with "
                "FixedClassifier.read_images, which converts and resizes them."
            )

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``[B, len(class_names)]`` of images ``[B, channels, image_size, image_size]``."""
        self.check_images(images)
        return self.network(images)

    def train(self, mode: bool = True) -> FixedClassifier:
        super().train(mode)
        if self.statistics == "fixed":
            for _, bn in _batch_norms(self.network):
                bn.eval()  # frozen statistics are never updated
        return self

    def read_images(self, paths: Sequence[str | Path]) -> Tensor:
        """Image files as a batch ``[B, C, H, W]`` in this classifier's input format.

        The same reading as the folder data modules: scaled to ``[0, 1]``, converted to
        ``channels``, inverted if ``invert``, resized (antialiased) to ``image_size``, then
        normalised by ``mean``/``std`` if set.
        """
        images = read_image_files(
            paths, self.image_size, self.channels, self.invert, self.mean, self.std
        )
        return images.to(next(self.parameters()).device)

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the classifier to ``path`` (loadable with ``torch.load(weights_only=True)``)."""
        from lightning_metakd.atomic import atomic_write

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "network": component_spec(self.network),
            "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "class_names": list(self.class_names),
            "image_size": self.image_size,
            "channels": self.channels,
            "invert": self.invert,
            "mean": self.mean,
            "std": self.std,
            "statistics": self.statistics,
        }
        atomic_write(path, lambda handle: torch.save(payload, handle))
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: Any = "cpu") -> FixedClassifier:
        """Read a classifier written by :meth:`save` (no pickled code is executed)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"No classifier at {path}; `metakd finetune` writes one (classifier.pt)."
            )
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ValueError(f"{path} is not a readable PyTorch file: {err}") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            hint = (
                " It is a training checkpoint: make a classifier from it with "
                "`metakd finetune --checkpoint <it> --data_root <class folders>`."
                if isinstance(payload, dict) and "state_dict" in payload
                else ""
            )
            raise ValueError(f"{path} is not a FixedClassifier file.{hint}")
        if payload.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer lightning-metakd (format version "
                f"{payload['format_version']} > {FORMAT_VERSION}); upgrade the package."
            )
        network = prepare_model(build_component(payload["network"]))
        classifier = cls(
            network,
            payload["class_names"],
            payload["image_size"],
            payload["channels"],
            payload["invert"],
            payload.get("mean"),
            payload.get("std"),
        )
        if payload["statistics"] == "fixed":
            placeholders = {
                name: (torch.zeros(bn.num_features), torch.ones(bn.num_features))
                for name, bn in _batch_norms(network)
            }
            freeze_batch_norm(network, placeholders)
            classifier.statistics = "fixed"
        network.load_state_dict(payload["state_dict"])
        if isinstance(map_location, str | torch.device):
            classifier.to(map_location)
        return classifier

    def extra_repr(self) -> str:
        return (
            f"classes={len(self.class_names)}, image_size={self.image_size}, "
            f"channels={self.channels}, invert={self.invert}, mean={self.mean}, std={self.std}, "
            f"statistics={self.statistics!r}"
        )


__all__ = [
    "FORMAT",
    "FixedClassifier",
    "MatchingClassifier",  # re-exported: classifier files of 0.1 name them here
    "PrototypeClassifier",
    "image_statistics",
    "normalize_images",
    "read_image_files",
]
