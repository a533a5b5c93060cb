"""int8 versions of an exported learner's graphs: ONNX Runtime static quantisation.

:func:`quantize_learner` turns the fp32 ``enrol.onnx`` and ``classify.onnx`` of
:func:`~lightning_metakd.deploy.learner_export.export_learner` into int8 graphs in their own folder
(``<export>/int8`` by default, a complete exported learner: ``metakd classify --model
<export>/int8 --enrol ...`` runs it). Static quantisation (Jacob et al. 2018) stores the weights of
the convolutions and matrix products as int8 — per output channel — and quantises their inputs with
ranges measured on calibration data: here meta-training tasks (:func:`calibration_tasks`), each
task's support set through ``enrol`` and its queries, with the fp32 state of that support set,
through ``classify``. The rest of the graph (BatchNorm with support statistics, the distances to
the prototypes, the softmax of the inner steps) stays float: it is cheap and the accuracy rests on
it. The int8 folder gets its own fingerprint, so a state enrolled in fp32 is not mixed with int8.

Why static QDQ with per-channel weights and these operators: ``benchmarks/deploy.py`` measures the
choices on the 600 fixed test episodes (``docs/deploy.md``).

Example::

    tasks = calibration_tasks(calibration_datamodule("configs/kanji/distill_protonet.yaml"))
    report = quantize_learner("runs/kanji-distill-protonet/version_0/export", tasks)
    report["dir"], report["argmax_agree"]
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from lightning_metakd.deploy.exported_learner import load_exported_learner, read_learner_metadata
from lightning_metakd.deploy.learner_graphs import GRAPH_FILES, LEARNER_FILE, ExportError

#: Where :func:`quantize_learner` writes by default, inside the fp32 export folder.
INT8_DIR = "int8"
#: Operators whose inputs and weights are quantised (the others stay float32).
OPERATORS = ("Conv", "MatMul", "Gemm")
#: The stream of :meth:`EpisodicDataModule.calibration_images`: the same fixed meta-training tasks
#: that population statistics are estimated from.
CALIBRATION_STREAM = 3


def calibration_datamodule(config: str | Path) -> Any:
    """The data module of a LightningCLI config's ``data:`` section, set up for training tasks."""
    import yaml

    from lightning_metakd.report import report_datamodule

    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(
            f"No config {path}; --calibration takes a config whose data: section gives the "
            "meta-training tasks, e.g. configs/kanji/distill_protonet.yaml."
        )
    data = (yaml.safe_load(path.read_text()) or {}).get("data")
    if not isinstance(data, dict):
        raise ExportError(f"{path} has no data: section to draw meta-training tasks from.")
    datamodule = report_datamodule(data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def calibration_tasks(datamodule: Any, tasks: int = 32) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``tasks`` fixed meta-training tasks ``(support_x, support_y, query_x)`` of ``datamodule``.

    Drawn as :meth:`~lightning_metakd.data.EpisodicDataModule.calibration_images` draws them
    (the training split, its ways and shots, a seeded stream of its own): the same on every call.
    """
    from lightning_metakd.data.sampler import EpisodeSampler

    train = datamodule.splits["train"]
    sampler = EpisodeSampler(
        train, ways=datamodule.ways, shots=datamodule.shots, queries=datamodule.queries,
        num_tasks=tasks, fixed=True, seed=datamodule.seed, stream=CALIBRATION_STREAM,
        grouping=datamodule.grouping != "none", split="train",
    )  # fmt: skip
    return [tuple(train[spec][:3]) for spec in sampler]  # type: ignore[misc]


class _Feeds:
    """An ONNX Runtime ``CalibrationDataReader`` over prepared input dictionaries."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_learner(
    model_dir: str | Path,
    tasks: Iterable[tuple[Tensor, Tensor, Tensor]],
    out_dir: str | Path | None = None,
    *,
    per_channel: bool = True,
    operators: Sequence[str] = OPERATORS,
) -> dict[str, Any]:
    """Write int8 ``enrol.onnx`` and ``classify.onnx`` of the fp32 export in ``model_dir``.

    Args:
        model_dir: what :func:`~lightning_metakd.deploy.learner_export.export_learner` wrote
            (with ONNX graphs).
        tasks: calibration tasks ``(support_x, support_y, query_x)`` (:func:`calibration_tasks`).
        out_dir: default ``<model_dir>/int8``.
        per_channel: one weight scale per output channel (else one per tensor).
        operators: ONNX operator types to quantise.

    Returns:
        ``{"dir": path, "bytes": size of both graphs, "fingerprint": str, "argmax_agree": share of
        the calibration queries the int8 graphs label as the fp32 ones, "queries": count}``.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model_dir = Path(model_dir)
    metadata = read_learner_metadata(model_dir)
    if "onnx" not in metadata["graphs"]:
        raise ExportError(
            f"{model_dir} has no ONNX graphs to quantise; export with --formats onnx."
        )
    if metadata.get("precision") != "fp32":
        raise ExportError(f"{model_dir} is already quantised ({metadata.get('precision')}).")
    fp32 = load_exported_learner(model_dir, "onnx")
    tasks = list(tasks)
    if not tasks:
        raise ExportError("quantize_learner needs at least one calibration task.")
    enrol_feeds, classify_feeds, expected = [], [], []
    for support_x, support_y, query_x in tasks:
        state = fp32.enrol(support_x, support_y)
        onehot = np.eye(len(state.class_names), dtype=np.float32)[np.asarray(support_y)]
        enrol_feeds.append({"support_images": support_x.numpy(), "support_onehot": onehot})
        classify_feeds.append({"query_images": query_x.numpy(), **state.tensors})
        expected.append(fp32.classify(state, query_x).argmax(-1))

    out = model_dir / INT8_DIR if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = GRAPH_FILES["onnx"]
    with tempfile.TemporaryDirectory() as tmp:
        for graph, feeds in (("enrol", enrol_feeds), ("classify", classify_feeds)):
            prepared = Path(tmp) / files[graph]
            quant_pre_process(
                str(model_dir / files[graph]), str(prepared), skip_symbolic_shape=True
            )
            quantize_static(
                str(prepared), str(out / files[graph]), _Feeds(feeds),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8, per_channel=per_channel,
                op_types_to_quantize=list(operators), calibrate_method=CalibrationMethod.MinMax,
            )  # fmt: skip
    settings = {"method": "static", "format": "QDQ", "per_channel": per_channel,
                "operators": list(operators), "calibration_tasks": len(tasks)}  # fmt: skip
    digest = hashlib.sha256(f"{metadata['fingerprint']}:int8:{json.dumps(settings)}".encode())
    quantized = {
        **metadata,
        "fingerprint": digest.hexdigest()[:16],
        "precision": "int8",
        "quantization": settings,
        "graphs": {"onnx": dict(files)},
    }
    (out / LEARNER_FILE).write_text(json.dumps(quantized, indent=2) + "\n", encoding="utf-8")

    int8 = load_exported_learner(out, "onnx")
    agree = queries = 0
    for (support_x, support_y, query_x), labels in zip(tasks, expected, strict=True):
        logits = int8.classify(int8.enrol(support_x, support_y), query_x)
        agree += int((logits.argmax(-1) == labels).sum())
        queries += len(query_x)
    return {
        "dir": str(out),
        "bytes": sum((out / name).stat().st_size for name in files.values()),
        "fingerprint": quantized["fingerprint"],
        "argmax_agree": agree / queries,
        "queries": queries,
    }


__all__ = [
    "INT8_DIR",
    "OPERATORS",
    "calibration_datamodule",
    "calibration_tasks",
    "quantize_learner",
]
