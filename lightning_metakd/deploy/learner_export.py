"""Export a learner's adaptation itself: ``enrol`` and ``classify`` graphs that run without PyTorch.

:func:`~lightning_metakd.deploy.export.export_classifier` freezes the classes at export time; a
device that meets a new class would need PyTorch to adapt again. :func:`export_learner` exports the
adaptation step instead, as two graphs (ONNX for ONNX Runtime and friends, and ``torch.export``):

- ``enrol``: ``support_images [S, C, H, W]`` and ``support_onehot [S, N]`` (the labels, one-hot)
  → the task state: ProtoNet's ``prototypes [N, D]``; MatchingNet's ``support_embeddings [S, D]``
  and ``support_classes [S, N]`` (one-hot); the adapted ``head_weight [N, D]`` and ``head_bias [N]`` of a
  head-only gradient learner (ANIL; MAML and Meta-SGD with ``frozen_body=True``), its inner steps
  unrolled in the graph. Under the ``"support"`` normalisation policy the state also holds
  ``statistics [2, ΣC]``: the mean (row 0) and biased variance (row 1) of every BatchNorm's input
  on the support set, layer after layer.
- ``classify``: ``query_images [M, C, H, W]`` and that state → ``logits [M, N]``. Every query is
  normalised with the state's statistics (``"support"``) or with population statistics folded into
  the graph (``"population"``), so a query's answer never depends on the other queries of its batch.

The numbers of ways, shots and queries are dynamic axes (a head-only learner's ways are its head's).
``learner.json`` beside the graphs says what a caller must feed them (image size, channels, the
preprocessing of the data pipeline, the state's names) and holds the model's fingerprint, a hash
of its weights and settings, which every enrolled state carries: a state is never classified by
another model (:mod:`lightning_metakd.deploy.exported_learner` checks it).

Head-only adaptation is written in closed form: for logits ``z = W f + b`` of frozen features ``f``
the cross-entropy gradient is ``∂L/∂z_i = (softmax(z_i) − y_i) / S``, ``∇W = (∂L/∂z)ᵀ F`` and
``∇b = Σ_i ∂L/∂z_i``, so each of the ``inner_steps_test`` steps ``θ ← θ − α ∇θ L`` (Finn et al. 2017,
eq. 1, restricted to the head as in ANIL, Raghu et al. 2020) is a handful of matrix products any
runtime has. Full-network MAML cannot be exported to ONNX with torch 2.14: ``docs/deploy.md``
says why.

Example::

    learner = load_learner("runs/kanji-distill-protonet/version_0/checkpoints/best.ckpt")
    report = export_learner(learner, "deploy/student")
    exported = load_exported_learner("deploy/student")
    state = exported.enrol(support_x, support_y, ["cat", "dog", "fox"])
    exported.classify(state, query_x).argmax(-1)
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from lightning_metakd.algorithms import ANIL, MAML, Learner
from lightning_metakd.algorithms.normalization import (
    TRANSDUCTIVE,
    Statistics,
    batch_norm_statistics,
    freeze_batch_norm,
)
from lightning_metakd.deploy.predict import FORMATS, require_onnx
from lightning_metakd.models.classifier import Classifier
from lightning_metakd.pretrained.registry import name_of

#: ``learner.json``: its ``format`` entry and layout version.
FORMAT = "lightning_metakd.ExportedLearner"
FORMAT_VERSION = 1
LEARNER_FILE = "learner.json"
#: The graph files of each format.
GRAPH_FILES = {
    "onnx": {"enrol": "enrol.onnx", "classify": "classify.onnx"},
    "torch_export": {"enrol": "enrol.pt2", "classify": "classify.pt2"},
}
#: The policies a graph can bake in: a transductive graph's answers would depend on the batch.
EXPORT_POLICIES = ("support", "population")
#: Names of the state tensors of the metric algorithms (others: ``state_0``, ``state_1``, ...).
STATE_NAMES = {
    "ProtoNet": ("prototypes",),
    "MatchingNet": ("support_embeddings", "support_classes"),
}
HEAD_STATE = ("head_weight", "head_bias")
SUPPORTED = (
    "ProtoNet, MatchingNet (any algorithm without a head and inner steps), ANIL, and MAML or "
    "Meta-SGD with frozen_body=True (--frozen_body)"
)


class ExportError(ValueError):
    """A learner, a setting or an input that the learner export cannot take; the message says why."""


# -- what is exported -------------------------------------------------------------------------------
def export_policy(learner: Learner, normalization: str | None = None) -> str:
    """The normalisation policy the graphs bake in: ``"support"`` or ``"population"``.

    ``None`` takes the learner's own, a transductive learner exporting with ``"support"`` (as
    :meth:`Learner.adapt <lightning_metakd.algorithms.Learner.adapt>` does on user data).
    """
    policy = normalization or learner.normalization
    if normalization is None and policy == "transductive":
        policy = "support"
    if policy not in EXPORT_POLICIES:
        raise ExportError(
            f"normalization={policy!r} cannot be exported: with transductive statistics a query's "
            "answer depends on the other queries of its batch; use 'support' (the support set's "
            "statistics, the default) or 'population'."
        )
    if policy == "population" and not bool(getattr(learner, "calibrated", False)):
        raise ExportError(
            "normalization='population' needs the learner's population statistics, which it has "
            "not estimated: call learner.calibrate(images) first, or give `metakd export "
            "--calibration CONFIG` (meta-training tasks), or export with 'support'."
        )
    return policy


def adaptation_kind(learner: Learner, frozen_body: bool = False) -> str:
    """``"metric"`` (no head, no inner steps) or ``"head"`` (a linear head's inner steps in the graph).

    Raises :class:`ExportError` for algorithms the graphs cannot adapt: MAML-family learners that
    adapt the body (unless ``frozen_body``), heads that are not one ``nn.Linear``, and others.
    """
    algorithm = learner.algorithm
    name = type(algorithm).__name__
    if not algorithm.needs_head:
        if algorithm.steps(False):
            raise ExportError(
                f"{name} takes {algorithm.steps(False)} inner steps without a head, which the "
                f"export cannot unroll; supported for in-graph adaptation: {SUPPORTED}."
            )
        return "metric"
    model = learner.model
    if not isinstance(algorithm, MAML) or not isinstance(model, Classifier):
        raise ExportError(
            f"{name} cannot be adapted inside an exported graph; supported for in-graph "
            f"adaptation: {SUPPORTED}. Export a fixed classifier instead (metakd finetune, then "
            "metakd export --classifier)."
        )
    head = {f"head.{n}" for n, _ in model.head.named_parameters()}
    if not isinstance(model.head, nn.Linear) or head != {"head.weight", "head.bias"}:
        raise ExportError(
            f"the head of this {name} learner is a {type(model.head).__name__}, not an nn.Linear "
            "with a bias; the exported inner steps are the closed-form gradient of a linear head."
        )
    adapted = algorithm.adapted_names(learner.params(detach=True))
    if adapted is not None and set(adapted) == head:
        return "head"
    if isinstance(algorithm, ANIL):
        raise ExportError(
            f"this ANIL adapts {sorted(adapted or [])[:3]}, not exactly the linear head; the "
            "exported inner steps adapt head.weight and head.bias only."
        )
    if not frozen_body:
        raise ExportError(
            f"{name} adapts every parameter, and full-network adaptation cannot be exported to "
            "ONNX (docs/deploy.md says why); export it with a frozen body (frozen_body=True, "
            "--frozen_body): the body stays θ* and the inner steps adapt the head, ANIL's update "
            "with this learner's θ* and step sizes."
        )
    return "head"


def head_only(learner: Learner) -> Learner:
    """A copy of a MAML-family ``learner`` whose inner loop adapts only ``head.*``: the reference
    of a ``frozen_body`` export (for ANIL, the same learner)."""
    frozen = copy.deepcopy(learner)
    names = ("head.weight", "head.bias")
    frozen.algorithm.adapted_names = lambda params: [n for n in params if n in names]
    return frozen


def fingerprint(learner: Learner, policy: str, kind: str) -> str:
    """A hash of everything that decides the exported graphs' numbers: the learner's tensors (its
    weights, meta-learned step sizes, population statistics), its components and the export's
    settings. A state enrolled by one model carries it, so another model refuses it."""
    digest = hashlib.sha256()
    settings = {"components": learner.components(), "policy": policy, "adaptation": kind}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(learner.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else b"bf16")
    return digest.hexdigest()[:16]


def _pack(statistics: Statistics, layers: Sequence[tuple[str, int]]) -> Tensor:
    """``{layer: (mean, var)}`` → ``[2, ΣC]``: means in row 0, variances in row 1, layer by layer."""
    return torch.cat([torch.stack(statistics[name]) for name, _ in layers], dim=1)


def _unpack(packed: Tensor, layers: Sequence[tuple[str, int]]) -> Statistics:
    """The inverse of :func:`_pack`."""
    parts = torch.split(packed, [channels for _, channels in layers], dim=1)
    return {name: (part[0], part[1]) for (name, _), part in zip(layers, parts, strict=True)}


def head_steps(
    features: Tensor,
    onehot: Tensor,
    weight: Tensor,
    bias: Tensor,
    step_sizes: tuple[Tensor | float, Tensor | float],
    steps: int,
) -> tuple[Tensor, Tensor]:
    """``steps`` gradient steps on the support cross-entropy of a linear head, in closed form.

    With logits ``z = F Wᵀ + b`` of the support features ``F [S, D]`` and labels ``Y [S, N]``
    (one-hot), ``L = mean_i CE(z_i, y_i)`` has ``∂L/∂z = (softmax(z) − Y) / S``, ``∇W = (∂L/∂z)ᵀ F``
    and ``∇b = Σ_i ∂L/∂z_i``; each step is ``W ← W − α_W ∇W``, ``b ← b − α_b ∇b`` (``α`` a float,
    or Meta-SGD's per-entry rates). The same numbers as :func:`~lightning_metakd.algorithms.
    inner_loop` restricted to the head, without autograd, so that any graph runtime can run it.
    """
    lr_weight, lr_bias = step_sizes
    for _ in range(steps):
        dz = (torch.softmax(F.linear(features, weight, bias), dim=-1) - onehot) / features.shape[0]
        weight = weight - lr_weight * (dz.transpose(0, 1) @ features)
        bias = bias - lr_bias * dz.sum(0)
    return weight, bias


class _Graph(nn.Module):
    """What the enrol and classify graphs share: the network to export and how it normalises."""

    def __init__(self, learner: Learner, policy: str, kind: str) -> None:
        super().__init__()
        model = copy.deepcopy(learner.model).eval().requires_grad_(False)
        if policy == "population":
            # Fixed statistics as BatchNorm running statistics: exported as plain BatchNorm, which
            # ONNX Runtime folds into the convolutions.
            freeze_batch_norm(model, learner.population_statistics())
        self.model, self.algorithm = model, copy.deepcopy(learner.algorithm).eval()
        self.policy, self.kind = policy, kind
        self.layers = [
            (n, m.num_features)
            for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.steps = learner.algorithm.steps(False)
        if kind == "head":
            sizes = learner.algorithm.step_sizes()
            self.step_sizes = tuple(
                sizes[n].detach() if isinstance(sizes, dict) else float(sizes)
                for n in ("head.weight", "head.bias")
            )
        self.state_spec: Any = None  # the metric algorithm's state pytree (set by export_learner)
        self.bool_leaves: list[bool] = []
        self.ways_at: tuple[int, int] = (0, 0)  # (leaf, axis) of the state that counts the ways
        self.eval()

    def params(self) -> dict[str, Tensor]:
        return dict(self.model.named_parameters())

    def normalising(self, statistics: Statistics | None = None) -> Any:
        """Record (``None``) or impose the support statistics under ``"support"``; nothing else."""
        if self.policy != "support":
            return contextlib.nullcontext()
        return batch_norm_statistics(self.model, statistics)


class EnrolGraph(_Graph):
    """``(support_images [S, C, H, W], support_onehot [S, N])`` → the state tensors of a task."""

    def adapt(self, support_images: Tensor, support_onehot: Tensor) -> list[Tensor]:
        """The algorithm's state of one task as a list of tensors (no statistics)."""
        if self.kind == "head":
            features = self.model.forward_features(support_images).flatten(1)
            head = self.model.head
            weight, bias = head_steps(
                features, support_onehot, head.weight, head.bias, self.step_sizes, self.steps
            )
            return [weight, bias]
        labels, ways = support_onehot.argmax(1), support_onehot.shape[1]
        task = self.algorithm.adapt_task(
            self.model, self.params(), support_images, labels, ways, False, TRANSDUCTIVE
        )
        return [leaf.float() if leaf.dtype == torch.bool else leaf for leaf in self._leaves(task)]

    def _leaves(self, task: Any) -> list[Tensor]:
        leaves, spec = pytree.tree_flatten(task.state)
        if self.state_spec is None:
            self.state_spec, self.bool_leaves = spec, [t.dtype == torch.bool for t in leaves]
        return leaves

    def forward(self, support_images: Tensor, support_onehot: Tensor) -> tuple[Tensor, ...]:
        with self.normalising() as record:
            state = self.adapt(support_images, support_onehot)
        if self.policy == "support":
            state.append(_pack(record.recorded, self.layers))
        return tuple(state)


class ClassifyGraph(_Graph):
    """``(query_images [M, C, H, W], *state)`` → ``logits [M, N]``."""

    def forward(self, query_images: Tensor, *state: Tensor) -> Tensor:
        statistics = _unpack(state[-1], self.layers) if self.policy == "support" else None
        leaves = list(state[:-1] if self.policy == "support" else state)
        with self.normalising(statistics):
            if self.kind == "head":
                features = self.model.forward_features(query_images).flatten(1)
                return F.linear(features, leaves[0], leaves[1])
            leaves = [t > 0.5 if b else t for t, b in zip(leaves, self.bool_leaves, strict=True)]
            leaf, axis = self.ways_at
            ways = leaves[leaf].shape[axis]
            task_state = pytree.tree_unflatten(leaves, self.state_spec)
            return self.algorithm.logits(self.model, self.params(), task_state, query_images, ways)


# -- export ---------------------------------------------------------------------------------------
def _input_format(learner: Learner) -> tuple[int, int]:
    backbone = learner.backbone
    size, channels = getattr(backbone, "image_size", None), getattr(backbone, "in_channels", None)
    if not isinstance(size, int) or not isinstance(channels, int):
        raise ExportError(
            f"the learner's {type(backbone).__name__} states no image_size and in_channels "
            "attributes, which the exported graphs need to fix their input format; give the "
            "backbone these attributes (the library's backbones have them)."
        )
    return size, channels


def _state_axes(
    enrol: EnrolGraph, ways: tuple[int, int], shots: tuple[int, int], channels: int, size: int
) -> list[dict[int, str]]:
    """Which axes of each state tensor count the ways and which the support images.

    The enrol graph runs (in PyTorch) on two support sets of different sizes; an axis that follows
    the number of ways is ``"ways"``, one that follows the number of images ``"support"``, and any
    other must keep its size.
    """
    shapes = []
    for i, (n, k) in enumerate(zip(ways, shots, strict=True)):
        with torch.no_grad():
            state = enrol(
                _example_images(n * k, channels, size, i), torch.eye(n)[torch.arange(n * k) % n]
            )
        shapes.append([tuple(t.shape) for t in state])
    axes: list[dict[int, str]] = []
    for first, second in zip(*shapes, strict=True):
        found: dict[int, str] = {}
        for axis, (a, b) in enumerate(zip(first, second, strict=True)):
            if a == b:
                continue
            if ways[0] != ways[1] and (a, b) == ways:
                found[axis] = "ways"
            elif (a, b) == (ways[0] * shots[0], ways[1] * shots[1]):
                found[axis] = "support"
            else:
                raise ExportError(
                    f"a state tensor of {type(enrol.algorithm).__name__} has an axis of size {a} "
                    f"or {b} that follows neither the ways nor the support images; it cannot be "
                    "exported with dynamic axes."
                )
        axes.append(found)
    return axes


def _state_names(graph: EnrolGraph, count: int) -> list[str]:
    if graph.kind == "head":
        names = list(HEAD_STATE)
    else:
        known = STATE_NAMES.get(type(graph.algorithm).__name__, ())
        names = list(known) if len(known) == count else [f"state_{i}" for i in range(count)]
    return names + (["statistics"] if graph.policy == "support" else [])


def strip_onnx(path: Path) -> None:
    """Drop the exporter's per-node debugging metadata (stack traces with this machine's paths,
    module names: about 1 kB per node, most of a small model's file) from the ONNX file at ``path``."""
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        del node.metadata_props[:]
    onnx.save(model, str(path))


def _example_images(count: int, channels: int, size: int, seed: int) -> Tensor:
    return torch.rand(count, channels, size, size, generator=torch.Generator().manual_seed(seed))


def export_learner(
    learner: Learner,
    out_dir: str | Path,
    formats: Iterable[str] = ("onnx", "torch_export"),
    *,
    normalization: str | None = None,
    frozen_body: bool = False,
    invert: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    check_episodes: Sequence[tuple[Tensor, Tensor, Tensor]] | None = None,
    atol: float = 1e-4,
    rtol: float = 0.0,
    source: str | None = None,
) -> dict[str, Any]:
    """Write ``learner``'s enrol and classify graphs to ``out_dir`` and check them against it.

    Args:
        learner: a meta-learner or a distilled student (:func:`~lightning_metakd.modules.
            load_learner`); it is not modified.
        out_dir: created if needed; existing graph files there are overwritten.
        formats: ``"onnx"`` (``enrol.onnx``, ``classify.onnx``) and/or ``"torch_export"``
            (``enrol.pt2``, ``classify.pt2``).
        normalization: the policy the graphs bake in, ``"support"`` or ``"population"``
            (:func:`export_policy`; default the learner's, transductive learners ``"support"``).
        frozen_body: export a MAML or Meta-SGD learner with head-only adaptation.
        invert, mean, std: the preprocessing the images need, as the data pipeline applied it
            (``1 − x``, then ``(x − mean) / std`` per channel), recorded in ``learner.json``.
        check_episodes: ``(support_x, support_y, query_x)`` tasks the graphs are verified on
            (:func:`verify_learner_export`); default three random tasks of 1-3 shots.
        atol, rtol: the accepted ``max |Δlogits|`` (:func:`verify_learner_export`).
        source: where the learner came from (a checkpoint path), recorded in ``learner.json``.

    Returns:
        ``{"files": {format: {graph: path}}, "bytes": {format: {graph: size}}, "max_abs_diff":
        {format: float}, "argmax_agree": {format: float}, "metadata": path, "fingerprint": str}``.

    Raises:
        ExportError: an algorithm or setting the graphs cannot take (the message names the fix).
        AssertionError: exported logits that differ from the learner's by more than the tolerance.
    """
    formats = tuple(formats)
    if not formats or any(f not in GRAPH_FILES for f in formats):
        raise ExportError(f"formats must be a non-empty subset of {FORMATS}, got {formats}.")
    if "onnx" in formats:
        require_onnx()
    if (mean is None) != (std is None):
        raise ExportError("give both mean and std (or neither).")
    policy = export_policy(learner, normalization)
    kind = adaptation_kind(learner, frozen_body)
    size, channels = _input_format(learner)
    for key, values in (("mean", mean), ("std", std)):
        if values is not None and len(values) != channels:
            raise ExportError(
                f"{key} needs {channels} values (one per channel), got {list(values)}."
            )
    enrol, classify = EnrolGraph(learner, policy, kind), ClassifyGraph(learner, policy, kind)

    # The example task: sizes that differ from one another (ways, support, queries), traced
    # after two PyTorch runs have told the state's dynamic axes apart from its fixed ones.
    probe_ways = (learner.ways, learner.ways) if kind == "head" else (3, 4)
    axes = _state_axes(enrol, probe_ways, (2, 3), channels, size)
    ways = probe_ways[1]
    support_x = _example_images(3 * ways, channels, size, 1)
    onehot = torch.eye(ways)[torch.arange(3 * ways) % ways]
    query_x = _example_images(3 * ways + 1, channels, size, 2)
    with torch.no_grad():
        state = enrol(support_x, onehot)
    classify.state_spec, classify.bool_leaves = enrol.state_spec, enrol.bool_leaves
    if kind == "metric":
        classify.ways_at = next(
            (i, axis)
            for i, found in enumerate(axes)
            for axis, what in found.items()
            if what == "ways"
        )
    names = _state_names(enrol, len(state) - (policy == "support"))

    dims = {
        "support": torch.export.Dim("support", min=2),
        "ways": torch.export.Dim("ways", min=2),
        "queries": torch.export.Dim("queries"),
    }
    enrol_inputs = (support_x, onehot)
    enrol_shapes = (
        {0: dims["support"]},
        {0: dims["support"]} | ({} if kind == "head" else {1: dims["ways"]}),
    )
    classify_inputs = (query_x, *state)
    # ClassifyGraph.forward(query_images, *state): the state's shapes are one nested tuple
    classify_shapes = (
        {0: dims["queries"]},
        tuple({axis: dims[what] for axis, what in found.items()} for found in axes),
    )
    graphs = {
        "enrol": (enrol, enrol_inputs, enrol_shapes, ["support_images", "support_onehot"], names),
        "classify": (classify, classify_inputs, classify_shapes, ["query_images", *names], ["logits"]),
    }  # fmt: skip

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {}
    for fmt in formats:
        files[fmt] = {}
        for graph_name, (module, inputs, shapes, input_names, output_names) in graphs.items():
            path = files[fmt][graph_name] = out / GRAPH_FILES[fmt][graph_name]
            with torch.no_grad(), warnings.catch_warnings():
                # torch.onnx names the dynamic axes after the Dims, and warns that the support axes
                # of two inputs share one name, which is what they should do.
                warnings.filterwarnings("ignore", message=".*shares the same shape constraints")
                if fmt == "torch_export":
                    program = torch.export.export(module, inputs, dynamic_shapes=shapes)
                    torch.export.save(program, path)
                else:
                    torch.onnx.export(
                        module, inputs, path, input_names=input_names, output_names=output_names,
                        dynamic_shapes=shapes, external_data=False, dynamo=True, verbose=False,
                    )  # fmt: skip
                    strip_onnx(path)

    model_fingerprint = fingerprint(learner, policy, kind)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fingerprint": model_fingerprint,
        "precision": "fp32",
        "algorithm": type(learner.algorithm).__name__,
        "adaptation": kind,
        "inner_steps": enrol.steps if kind == "head" else 0,
        "normalization": policy,
        "ways": learner.ways if kind == "head" else None,
        "image_size": size,
        "channels": channels,
        "invert": bool(invert),
        "mean": None if mean is None else [float(v) for v in mean],
        "std": None if std is None else [float(v) for v in std],
        "state": names,
        "statistics_layers": [[n, c] for n, c in enrol.layers] if policy == "support" else [],
        "graphs": {f: {g: p.name for g, p in paths.items()} for f, paths in files.items()},
        "source": source,
    }
    meta_path = out / LEARNER_FILE
    meta_path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    if check_episodes is None:
        check_episodes = random_episodes(learner, kind, channels, size)
    verified = verify_learner_export(
        learner, out, check_episodes, formats, frozen_body=kind == "head", atol=atol, rtol=rtol
    )
    return {
        "files": {f: {g: str(p) for g, p in paths.items()} for f, paths in files.items()},
        "bytes": {f: {g: p.stat().st_size for g, p in paths.items()} for f, paths in files.items()},
        "max_abs_diff": {f: v["max_abs_diff"] for f, v in verified.items()},
        "argmax_agree": {f: v["argmax_agree"] for f, v in verified.items()},
        "metadata": str(meta_path),
        "fingerprint": model_fingerprint,
    }


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
                _example_images(len(support_y), channels, size, 10 + i),
                support_y,
                _example_images(3 + 4 * i, channels, size, 20 + i),
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
    learner whose inner loop adapts only its head (:func:`head_only`). Returns ``{format:
    {"max_abs_diff": max |Δlogits| over all tasks, "argmax_agree": share of queries with the same
    argmax, "tasks": count}}``. Raises ``AssertionError`` when a task's difference exceeds
    ``atol + rtol · max |logits| + 4 · r``, where ``r`` is the float32 rounding of PyTorch itself
    on that task (its distance from the float64 learner): BatchNorm over a support set of a few
    images divides by a small variance, which can amplify rounding to ~1e-3 on logits near 100 in
    untrained networks; an export with other semantics is far outside that.
    """
    from lightning_metakd.deploy.exported_learner import load_exported_learner

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


def default_output(checkpoint: str | Path) -> Path:
    """``runs/<name>/version_N/export`` for ``runs/<name>/version_N/checkpoints/best.ckpt``;
    ``runs/pretrained/<name>/export`` for ``pretrained:<name>`` (never inside the package)."""
    name = name_of(checkpoint)
    if name is not None:
        return Path("runs") / "pretrained" / name / "export"
    path = Path(checkpoint)
    return (
        path.parent.parent / "export"
        if path.parent.name == "checkpoints"
        else path.parent / "export"
    )


def calibration_learner(learner: Learner, datamodule: Any) -> Learner:
    """``learner`` with population statistics of ``datamodule``'s meta-training tasks."""
    population = copy.deepcopy(learner)
    population.normalization = "population"
    return population.calibrate(datamodule.calibration_images())


def export_learner_main(opts: Any) -> int:
    """``metakd export --learner CHECKPOINT``: the enrol and classify graphs of a checkpoint.

    ``opts`` are :func:`~lightning_metakd.deploy.export.export_main`'s parsed arguments.
    """
    from lightning_metakd.command_line import fail
    from lightning_metakd.modules import CheckpointError, load_learner

    try:
        learner = load_learner(opts.learner)
        datamodule = None
        if opts.calibration is not None:
            from lightning_metakd.deploy.quantize import calibration_datamodule

            datamodule = calibration_datamodule(opts.calibration)
        if opts.normalization == "population" and learner.normalization != "population":
            if datamodule is None:
                raise ExportError(
                    "--normalization population needs meta-training images to estimate the "
                    "statistics from: pass --calibration CONFIG (a config whose data: section "
                    "gives the meta-training tasks, e.g. configs/kanji/distill_protonet.yaml)."
                )
            learner = calibration_learner(learner, datamodule)
        if opts.int8 and datamodule is None:
            raise ExportError(
                "--int8 calibrates the quantised graphs on meta-training tasks: pass "
                "--calibration CONFIG (e.g. configs/kanji/distill_protonet.yaml)."
            )
        out = Path(opts.output) if opts.output else default_output(opts.learner)
        result = export_learner(
            learner, out, opts.formats, normalization=opts.normalization,
            frozen_body=opts.frozen_body, invert=opts.invert, mean=opts.mean, std=opts.std,
            atol=opts.atol, rtol=opts.rtol, source=str(opts.learner),
        )  # fmt: skip
        quantized = None
        if opts.int8:
            from lightning_metakd.deploy.quantize import calibration_tasks, quantize_learner

            quantized = quantize_learner(out, calibration_tasks(datamodule))
    except (CheckpointError, OSError, ValueError, ImportError, AssertionError) as err:
        return fail("metakd export", err)
    for fmt, graphs in result["files"].items():
        sizes = ", ".join(
            f"{Path(p).name} {result['bytes'][fmt][g] / 1024:.0f} kB" for g, p in graphs.items()
        )
        print(
            f"{fmt}: {sizes}; enrol + classify vs learner.adapt + predict: max |Δlogits| "
            f"{result['max_abs_diff'][fmt]:.2e}, argmax agree {100 * result['argmax_agree'][fmt]:.0f}%"
        )
    print(f"{result['metadata']}: input format, state, fingerprint {result['fingerprint']}")
    if quantized is not None:
        print(
            f"int8: {quantized['dir']} ({quantized['bytes'] / 1024:.0f} kB), argmax agrees with "
            f"fp32 on {100 * quantized['argmax_agree']:.1f}% of {quantized['queries']} "
            "calibration queries"
        )
    return 0


__all__ = [
    "EXPORT_POLICIES",
    "ClassifyGraph",
    "EnrolGraph",
    "ExportError",
    "LEARNER_FILE",
    "adaptation_kind",
    "export_learner",
    "export_policy",
    "fingerprint",
    "head_only",
    "head_steps",
    "random_episodes",
    "verify_learner_export",
]
