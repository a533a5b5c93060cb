"""Target-task fine-tuning: from a meta-learned (or distilled) learner to a user's own classifier.

A user brings a folder of class folders with a few images each (the layout of
:class:`~lightning_metakd.data.FolderDataModule`, read with the same code). :func:`run_finetune`:

1. loads the learner from a ``MetaLearnerModule`` or ``DistillationModule`` checkpoint (the
   distilled student);
2. holds out part of each class's images (:func:`holdout_split`, seeded);
3. adapts the learner once on the rest and folds the result into a
   :class:`~lightning_metakd.deploy.FixedClassifier` (:func:`finetune`) — MAML's adapted θ',
   ProtoNet's prototypes, MatchingNet's support set;
4. optionally fine-tunes that network further for ``epochs`` on the same images, with the
   MAML-anchored regulariser ``λ‖θ − θ*‖²`` towards the meta-learned θ* (``anchor_weight`` = λ);
5. reports held-out accuracy after adaptation and after fine-tuning, and writes
   ``<output>/classifier.pt``, ``<output>/finetune.json`` and ``<output>/holdout.png`` (the
   held-out images with predicted and true class, wrong ones in red: :mod:`.sheet`).

``metakd finetune --config configs/kanji/finetune.yaml`` runs it from the command line
(:func:`finetune_main`), and the optional ``finetune`` stage of ``metakd pipeline`` after
distillation.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_metakd.algorithms import Learner
from lightning_metakd.atomic import atomic_write
from lightning_metakd.command_errors import fail
from lightning_metakd.command_line import finetune_parser
from lightning_metakd.deploy.classifier import STATISTICS, FixedClassifier, normalize_images
from lightning_metakd.deploy.labelled import (
    FinetuneError,
    LabelledImages,
    accuracy,
    holdout_sheet,
    holdout_split,
    probabilities,
    read_class_folders,
)
from lightning_metakd.deploy.sheet import SHEET_FILE
from lightning_metakd.distill import parameter_anchor_loss
from lightning_metakd.modules import CheckpointError
from lightning_metakd.modules import load_learner as read_learner

#: Files written into the output folder.
CLASSIFIER_FILE = "classifier.pt"
REPORT_FILE = "finetune.json"


class FinetuneEpoch(NamedTuple):
    """Progress of one fine-tuning epoch (passed to the ``progress`` callback of :func:`finetune`)."""

    epoch: int  #: 1-based
    epochs: int
    loss: float  #: mean objective over the epoch's steps
    task_loss: float  #: mean cross-entropy on the labelled images
    anchor_loss: float  #: mean ``λ‖θ − θ*‖²`` (0 when the anchor is off)
    anchor_distance: float  #: ``‖θ − θ*‖²`` after the epoch


# -- the learner ------------------------------------------------------------------------------------
def load_learner(checkpoint: str | Path) -> Learner:
    """The learner of a ``MetaLearnerModule`` checkpoint, or the student of a ``DistillationModule``'s.

    :func:`lightning_metakd.modules.load_learner`, with its errors as :class:`FinetuneError`.
    """
    try:
        return read_learner(checkpoint)
    except CheckpointError as err:
        raise FinetuneError(str(err)) from None


def input_format(
    learner: Learner, image_size: int | None = None, channels: int | None = None
) -> tuple[int, int]:
    """``(image_size, channels)`` the learner's backbone takes, checked against the given ones.

    ``None`` takes the backbone's own value (its ``image_size`` / ``in_channels`` attributes).
    """
    backbone = learner.backbone
    found = {"image_size": image_size, "channels": channels}
    for key, attribute in (("image_size", "image_size"), ("channels", "in_channels")):
        built = getattr(backbone, attribute, None)
        given = found[key]
        if built is not None and given is not None and int(given) != int(built):
            raise FinetuneError(
                f"{key}={given} does not match the checkpoint, whose {type(backbone).__name__} was "
                f"built for {attribute}={built}. Leave {key} out (images are converted and resized "
                f"to the backbone's format) or set it to {built}."
            )
        if built is None and given is None:
            raise FinetuneError(
                f"the checkpoint's {type(backbone).__name__} states no {attribute}; pass {key}=."
            )
        found[key] = int(built if built is not None else given)
    return found["image_size"], found["channels"]


def _theta_star(learner: Learner, classifier: FixedClassifier) -> dict[str, Tensor]:
    """θ* under the classifier network's parameter names (a metric learner's model is its backbone)."""
    prefix = "" if learner.algorithm.needs_head else "backbone."
    device = next(classifier.parameters()).device
    return {prefix + name: t.to(device) for name, t in learner.theta_star().items()}


# -- adapt, fine-tune -------------------------------------------------------------------------------
def finetune(
    learner: Learner,
    images: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    *,
    epochs: int = 0,
    lr: float = 1e-3,
    optimizer: Literal["adam", "sgd"] = "adam",
    anchor_weight: float = 0.0,
    batch_size: int | None = None,
    statistics: Literal["fixed", "batch"] = "fixed",
    invert: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int = 0,
    progress: Callable[[FinetuneEpoch], None] | None = None,
) -> FixedClassifier:
    """Adapt ``learner`` on labelled images, optionally fine-tune further; a fixed classifier.

    First the learner adapts on all of ``images [M, C, H, W]`` / ``labels [M]`` (labels index
    ``class_names``), as it would on a support set, and the result is folded into a
    :class:`FixedClassifier` (:meth:`FixedClassifier.from_learner`). With ``epochs > 0`` every
    parameter of that network (backbone, head or prototypes) is then trained on the same images
    for ``epochs`` passes of the objective

    ``L = CE(f_θ(x), y) + λ‖θ − θ*‖²``

    with θ* the learner's meta-learned initialisation (the anchor of MAML-anchored distillation,
    :func:`~lightning_metakd.distill.parameter_anchor_loss`; ``anchor_weight`` = λ, 0 = off), so a
    few images move the network without pulling it far from what meta-training found.

    Args:
        epochs: passes over the images (0: adapt only).
        lr, optimizer: the step size and ``"adam"`` or ``"sgd"`` (momentum 0.9).
        anchor_weight: λ ≥ 0.
        batch_size: images per step (``None``: all of them, one step per epoch). BatchNorm uses
            each step's batch statistics, so keep batches of several images.
        statistics: ``"fixed"`` freezes the BatchNorm statistics of ``images`` into the result
            (each image is classified on its own); ``"batch"`` keeps batch statistics, the
            learner's own behaviour (see :class:`FixedClassifier`).
        invert, mean, std: recorded in the classifier: how ``images`` were prepared (see
            :class:`FixedClassifier`).
        seed: shuffles the mini-batches.
        progress: called with a :class:`FinetuneEpoch` after every epoch.
    """
    if statistics not in STATISTICS:
        raise FinetuneError(f"statistics must be one of {STATISTICS}, got {statistics!r}.")
    if optimizer not in ("adam", "sgd"):
        raise FinetuneError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}.")
    for name, value in (("epochs", epochs), ("lr", lr), ("anchor_weight", anchor_weight)):
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise FinetuneError(f"{name} must be a non-negative number, got {value!r}.")
    if batch_size is not None and batch_size < 2:
        raise FinetuneError(
            f"batch_size must be at least 2 (BatchNorm needs batch statistics) or None for all "
            f"images at once, got {batch_size}."
        )
    image_size, channels = input_format(learner)
    if images.dim() != 4 or tuple(images.shape[1:]) != (channels, image_size, image_size):
        raise FinetuneError(
            f"the learner takes images [M, {channels}, {image_size}, {image_size}], got "
            f"{tuple(images.shape)}; read them with read_class_folders(root, {image_size}, "
            f"{channels})."
        )
    device = next(learner.parameters()).device
    images, labels = images.to(device), labels.to(device).long()
    classifier = FixedClassifier.from_learner(
        learner, images, labels, class_names, invert=invert, mean=mean, std=std
    )
    if epochs:
        theta_star = _theta_star(learner, classifier)
        settings = dict(epochs=int(epochs), lr=lr, optimizer=optimizer, batch_size=batch_size)
        _train(classifier, theta_star, images, labels, anchor_weight, seed, progress, **settings)
    if statistics == "fixed":
        classifier.fix_statistics(images)
    return classifier.eval()


def _train(
    classifier: FixedClassifier,
    theta_star: dict[str, Tensor],
    images: Tensor,
    labels: Tensor,
    anchor_weight: float,
    seed: int,
    progress: Callable[[FinetuneEpoch], None] | None,
    *,
    epochs: int,
    lr: float,
    optimizer: str,
    batch_size: int | None,
) -> None:
    """:func:`finetune`'s training loop: ``epochs`` passes of ``CE + λ‖θ − θ*‖²`` over the images."""
    network = classifier.network
    params = [p for p in network.parameters() if p.requires_grad]
    opt = (
        torch.optim.Adam(params, lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(params, lr=lr, momentum=0.9)
    )
    size = len(images) if batch_size is None else min(batch_size, len(images))
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.enable_grad():
        images, labels = (
            images.clone(),
            labels.clone(),
        )  # usable by autograd even if made in inference mode
        network.train()
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(images), generator=generator).to(images.device)
            sums = torch.zeros(3)
            steps = 0
            for start in range(0, len(images), size):
                batch = order[start : start + size]
                if len(batch) < 2:
                    continue  # a lone image has no batch statistics
                task = F.cross_entropy(network(images[batch]), labels[batch])
                anchor = (
                    anchor_weight
                    * parameter_anchor_loss(dict(network.named_parameters()), theta_star)
                    if anchor_weight
                    else task.new_zeros(())
                )
                loss = task + anchor
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums += torch.stack([loss, task, anchor]).detach().cpu()
                steps += 1
            with torch.no_grad():
                distance = parameter_anchor_loss(dict(network.named_parameters()), theta_star)
            if progress is not None:
                mean = (sums / max(steps, 1)).tolist()
                progress(FinetuneEpoch(epoch, epochs, *mean, float(distance)))
    network.eval()
    for p in params:
        p.grad = None


# -- the whole job ---------------------------------------------------------------------------------
def run_finetune(
    checkpoint: str,
    data_root: str,
    output: str = "runs/finetune",
    holdout: int | float = 0.2,
    seed: int = 0,
    epochs: int = 0,
    lr: float = 1e-3,
    optimizer: Literal["adam", "sgd"] = "adam",
    anchor_weight: float = 0.0,
    batch_size: int | None = None,
    statistics: Literal["fixed", "batch"] = "fixed",
    invert: bool = False,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, object]:
    """Make a classifier for the classes of ``data_root`` from a checkpoint; returns the report.

    Writes ``<output>/classifier.pt`` (:meth:`FixedClassifier.save`) and ``<output>/finetune.json``
    (this report: classes, image counts, held-out accuracy after adaptation and, with
    ``epochs > 0``, after fine-tuning, the fine-tuning losses), and with held-out images
    ``<output>/holdout.png`` (:func:`holdout_sheet`: the final classifier's predictions).

    Args:
        checkpoint: a ``MetaLearnerModule`` or ``DistillationModule`` checkpoint (``best.ckpt``).
        data_root: a folder of class folders, a few images each.
        output: the folder to write into.
        holdout: images held out per class to measure accuracy: a fraction (0.2) or a count (2); 0
            for none.
        seed: picks the held-out images and shuffles fine-tuning batches.
        epochs: fine-tuning passes over the images after adaptation (0: adapt only).
        lr: fine-tuning step size.
        optimizer: "adam" or "sgd" (momentum 0.9).
        anchor_weight: λ of the λ‖θ − θ*‖² anchor to the meta-learned θ* (0: off).
        batch_size: images per fine-tuning step (default: all at once).
        statistics: "fixed" freezes the BatchNorm statistics of the labelled images into the
            classifier (each image is classified on its own); "batch" keeps the learner's batch
            statistics.
        invert: invert the images when reading them (dark drawings on a light background for a
            learner trained on light-on-dark ones, like KanjiVG).
        mean: per-channel mean subtracted after reading, as the learner's data module did
            (mini-ImageNet with normalize: [0.485, 0.456, 0.406]); default none.
        std: per-channel standard deviation divided by after ``mean``.
        image_size: input side length; default (and must equal) the backbone's.
        channels: input channels; default (and must equal) the backbone's.
        echo: where progress lines go (default: print, flushed).
    """
    say = echo or (lambda line: print(line, flush=True))
    learner = load_learner(checkpoint)
    size, chans = input_format(learner, image_size, channels)
    if (mean is None) != (std is None) or (mean is not None and not len(mean) == len(std) == chans):
        raise FinetuneError(
            f"give both mean and std, {chans} values each (one per channel), or neither; got "
            f"mean={mean}, std={std}."
        )
    data = read_class_folders(data_root, size, chans, invert)
    data = data._replace(images=normalize_images(data.images, mean, std))
    train, held_out = holdout_split(data.labels, data.class_names, holdout, seed)
    say(
        f"[finetune] {len(data.class_names)} classes, {len(data.labels)} images in {data_root}: "
        f"{len(train)} to adapt on, {len(held_out)} held out (seed {seed}); learner "
        f"{type(learner.backbone).__name__} {type(learner.algorithm).__name__}"
    )
    x, y = data.images[train], data.labels[train]
    options = dict(statistics=statistics, invert=invert, mean=mean, std=std, seed=seed)
    adapted = finetune(learner, x, y, data.class_names, **options)  # type: ignore[arg-type]
    report: dict[str, object] = {
        "checkpoint": str(checkpoint),
        "data_root": str(data_root),
        "classes": data.class_names,
        "train_images": len(train),
        "holdout_images": len(held_out),
        "holdout_files": [str(data.paths[i]) for i in held_out],
        "seed": seed,
        "statistics": statistics,
        "epochs": epochs,
        "anchor_weight": anchor_weight,
    }

    def measure(classifier: FixedClassifier, when: str) -> dict[str, object] | None:
        if not held_out:
            return None
        result = accuracy(classifier, data.images[held_out], data.labels[held_out])
        say(
            f"[finetune] {when}: held-out accuracy {100 * result['accuracy']:.2f}% "  # type: ignore[operator]
            f"({result['correct']}/{result['images']})"
        )
        return result

    report["adapted"] = measure(adapted, "adapted")
    classifier = adapted
    if epochs:
        history: list[FinetuneEpoch] = []
        every = max(1, int(epochs) // 10)

        def progress(step: FinetuneEpoch) -> None:
            history.append(step)
            if step.epoch % every == 0 or step.epoch == step.epochs:
                say(
                    f"[finetune] epoch {step.epoch}/{step.epochs}: loss {step.loss:.4f} (task "
                    f"{step.task_loss:.4f} + anchor {step.anchor_loss:.4f}), ‖θ−θ*‖² "
                    f"{step.anchor_distance:.4f}"
                )

        classifier = finetune(
            learner, x, y, data.class_names, epochs=epochs, lr=lr, optimizer=optimizer,
            anchor_weight=anchor_weight, batch_size=batch_size, progress=progress, **options,
        )  # type: ignore[arg-type]  # fmt: skip
        report["finetuned"] = measure(classifier, "fine-tuned")
        report["history"] = [step._asdict() for step in history]
    final = report.get("finetuned") or report["adapted"]
    report["holdout_accuracy"] = None if final is None else final["accuracy"]  # type: ignore[index]
    out = Path(output)
    report["classifier"] = str(classifier.save(out / CLASSIFIER_FILE))
    if held_out:
        report["sheet"] = str(holdout_sheet(classifier, data, held_out, out / SHEET_FILE).path)
    report["report"] = str(out / REPORT_FILE)
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(out / REPORT_FILE, lambda handle: handle.write(text.encode()))
    say(f"[finetune] wrote {out / CLASSIFIER_FILE} and {out / REPORT_FILE}")
    if held_out:
        say(f"[finetune] wrote {out / SHEET_FILE}: the held-out images, wrong ones in red")
    return report


def finetune_main(argv: list[str]) -> int:
    """``metakd finetune``: parse the flags or the YAML and run :func:`run_finetune`."""
    from jsonargparse import ArgumentError

    parser = finetune_parser()
    try:
        config = parser.parse_args(argv)
    except ArgumentError as err:
        print(f"metakd finetune: error: {err}", file=sys.stderr)
        return 2
    kwargs = {k: v for k, v in config.as_dict().items() if k != "config"}
    try:
        run_finetune(**kwargs)
    except (FinetuneError, OSError) as err:
        return fail("metakd finetune", err)
    return 0


__all__ = [
    "CLASSIFIER_FILE",
    "REPORT_FILE",
    "FinetuneEpoch",
    "FinetuneError",
    "LabelledImages",
    "accuracy",
    "finetune",
    "holdout_sheet",
    "finetune_main",
    "finetune_parser",
    "holdout_split",
    "input_format",
    "load_learner",
    "probabilities",
    "read_class_folders",
    "run_finetune",
]
