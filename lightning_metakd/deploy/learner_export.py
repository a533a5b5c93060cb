"""Export a learner's adaptation itself: ``enrol`` and ``classify`` graphs that run without PyTorch.

:func:`~lightning_metakd.deploy.export.export_classifier` freezes the classes at export time; a
device that meets a new class would need PyTorch to adapt again. :func:`export_learner` exports the
adaptation step instead, as two graphs (ONNX for ONNX Runtime and friends, and ``torch.export``):
``enrol`` (support images and their one-hot labels → the task state) and ``classify`` (query
images and that state → logits), the modules of :mod:`lightning_metakd.deploy.learner_graphs`,
which says what each state holds under each normalisation policy and how head-only adaptation is
written in closed form.

The numbers of ways, shots and queries are dynamic axes (a head-only learner's ways are its head's).
``learner.json`` beside the graphs says what a caller must feed them (image size, channels, the
preprocessing of the data pipeline, the state's names) and holds the model's fingerprint, a hash
of its weights and settings, which every enrolled state carries: a state is never classified by
another model (:mod:`lightning_metakd.deploy.exported_learner` checks it). Every export is checked
against the learner (:mod:`lightning_metakd.deploy.learner_verify`).

Example::

    learner = load_learner("runs/kanji-distill-protonet/version_0/checkpoints/best.ckpt")
    report = export_learner(learner, "deploy/student")
    exported = load_exported_learner("deploy/student")
    state = exported.enrol(support_x, support_y, ["cat", "dog", "fox"])
    exported.classify(state, query_x).argmax(-1)
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lightning_metakd.algorithms import Learner
from lightning_metakd.deploy.learner_graphs import (
    EXPORT_POLICIES,
    FORMAT,
    FORMAT_VERSION,
    GRAPH_FILES,
    HEAD_STATE,
    LEARNER_FILE,
    STATE_NAMES,
    SUPPORTED,
    ClassifyGraph,
    EnrolGraph,
    ExportError,
    adaptation_kind,
    export_policy,
    fingerprint,
    head_only,
    head_steps,
)
from lightning_metakd.deploy.learner_verify import (
    example_images,
    random_episodes,
    verify_learner_export,
)
from lightning_metakd.deploy.predict import FORMATS, require_onnx
from lightning_metakd.pretrained.registry import name_of


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
                example_images(n * k, channels, size, i), torch.eye(n)[torch.arange(n * k) % n]
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
    support_x = example_images(3 * ways, channels, size, 1)
    onehot = torch.eye(ways)[torch.arange(3 * ways) % ways]
    query_x = example_images(3 * ways + 1, channels, size, 2)
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
    from lightning_metakd.command_errors import fail
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
    "FORMAT",
    "FORMAT_VERSION",
    "GRAPH_FILES",
    "HEAD_STATE",
    "LEARNER_FILE",
    "STATE_NAMES",
    "SUPPORTED",
    "ClassifyGraph",
    "EnrolGraph",
    "ExportError",
    "adaptation_kind",
    "calibration_learner",
    "default_output",
    "export_learner",
    "export_learner_main",
    "export_policy",
    "fingerprint",
    "head_only",
    "head_steps",
    "random_episodes",
    "strip_onnx",
    "verify_learner_export",
]
