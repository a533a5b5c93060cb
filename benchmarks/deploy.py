"""Deployed classifier: size on disk and CPU latency per image, teacher against student.

Each model is a :class:`~lightning_metakd.deploy.FixedClassifier` — a ProtoNet backbone with a
5-class prototype layer and fixed BatchNorm statistics, 1x28x28 images, as ``metakd finetune``
makes it — exported with :func:`~lightning_metakd.deploy.export.export_classifier` to
``model.pt2`` (torch.export) and ``model.onnx``, verified against PyTorch on 64 held-out images,
then timed three ways on the CPU:

- ``eager``: the ``FixedClassifier`` itself under ``torch.inference_mode``;
- ``torch.export``: ``torch.export.load("model.pt2").module()``;
- ``onnxruntime``: an ONNX Runtime CPU session with as many intra-op threads as torch uses.

Latency is the median over ``--repeats`` timed blocks (each block runs the batch enough times to
last about ``--block-ms``) divided by the batch size, at batch 1 and batch 32. Models (teacher
first, then the student it is compared with):

- Conv4-64 ProtoNet (teacher), ResNet12 32-64-128-256 ProtoNet (a larger teacher),
- Conv4-16 ProtoNet (the distilled student).

Weights come from the KanjiVG checkpoints under ``runs/`` when they exist (the README's training
commands write them), otherwise they are random: size and latency do not depend on the values. The
prototypes are computed from random support images either way.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/deploy.py
    OMP_NUM_THREADS=1 python benchmarks/deploy.py --quick   # smoke run: Conv4 models, 3 blocks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

#: name, role, backbone constructor arguments, checkpoint the weights are read from if present.
MODELS = (
    (
        "Conv4-64 ProtoNet",
        "teacher",
        ("Conv4", {"in_channels": 1, "hidden": 64, "image_size": 28}),
        "runs/kanji-protonet/version_0/checkpoints/best.ckpt",
    ),
    (
        "ResNet12 ProtoNet",
        "teacher",
        ("ResNet12", {"in_channels": 1, "widths": (32, 64, 128, 256), "image_size": 28}),
        "runs/kanji-resnet12-protonet/version_0/checkpoints/best.ckpt",
    ),
    (
        "Conv4-16 ProtoNet, distilled",
        "student",
        ("Conv4", {"in_channels": 1, "hidden": 16, "image_size": 28}),
        "runs/kanji-distill-protonet/version_1/checkpoints/best.ckpt",
    ),
)
WAYS, IMAGE_SIZE = 5, 28
RUNTIMES = ("eager", "torch.export", "onnxruntime")


def build_classifier(backbone: tuple[str, dict], checkpoint: Path) -> tuple[torch.nn.Module, str]:
    """The FixedClassifier of ``checkpoint`` if it exists, else one with random weights."""
    from lightning_metakd import models
    from lightning_metakd.deploy import FixedClassifier, PrototypeClassifier
    from lightning_metakd.deploy.finetune import load_learner

    support_x = torch.rand(
        WAYS * 2, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)
    )
    support_y = torch.arange(WAYS).repeat(2)
    names = [f"class-{k}" for k in range(WAYS)]
    if checkpoint.is_file():
        learner = load_learner(checkpoint)
        classifier = FixedClassifier.from_learner(learner, support_x, support_y, names)
        weights = str(checkpoint)
    else:
        torch.manual_seed(0)
        net = getattr(models, backbone[0])(**backbone[1])
        network = PrototypeClassifier(net, WAYS, net.num_features)
        with torch.no_grad():  # ProtoNet's prototypes: the class means of the support embeddings
            embeddings = net(support_x)
            for k in range(WAYS):
                network.prototypes[k] = embeddings[support_y == k].mean(0)
        classifier = FixedClassifier(network, names, IMAGE_SIZE, 1)
        weights = "random"
    return classifier.fix_statistics(support_x).eval(), weights


def seconds_per_call(fn: Callable[[], object], repeats: int, block_ms: float) -> float:
    """Median seconds of one ``fn()`` over ``repeats`` blocks of about ``block_ms`` each."""
    fn()  # warm-up
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    calls = max(1, round(block_ms / 1000 / once))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def measure(name: str, role: str, backbone: tuple[str, dict], checkpoint: Path, args) -> dict:
    """Export one model, verify it, and time it in the three runtimes at batch 1 and 32."""
    from lightning_metakd.deploy.export import export_classifier
    from lightning_metakd.deploy.predict import load_exported

    classifier, weights = build_classifier(backbone, checkpoint)
    held_out = torch.rand(64, 1, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        # rtol: untrained random weights give squared distances in the hundreds
        report = export_classifier(classifier, held_out[:2], tmp, check_images=held_out, rtol=1e-5)
        runners = {
            "eager": classifier,
            "torch.export": load_exported(tmp, "torch_export"),
            "onnxruntime": load_exported(tmp, "onnx", threads=torch.get_num_threads()),
        }
        latency: dict[str, dict[str, float]] = {}
        for runtime, runner in runners.items():
            latency[runtime] = {}
            for batch in (1, 32):
                images = held_out[:batch].contiguous()

                def call(runner=runner, images=images) -> object:
                    with torch.inference_mode():
                        return runner(images)

                seconds = seconds_per_call(call, args.repeats, args.block_ms)
                latency[runtime][f"batch_{batch}"] = seconds / batch * 1000
    return {
        "model": name,
        "role": role,
        "weights": weights,
        "parameters": sum(p.numel() for p in classifier.parameters()),
        "bytes": report["bytes"],
        "max_abs_diff": report["max_abs_diff"],
        "ms_per_image": latency,
    }


def table(results: list[dict]) -> str:
    """Markdown table: per model, sizes on disk and milliseconds per image at batch 1 and 32."""
    lines = [
        "| model | role | parameters | model.pt2 | model.onnx | batch | eager | torch.export "
        "| onnxruntime |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        head = [
            r["model"],
            r["role"],
            f"{r['parameters']:,}",
            f"{r['bytes']['torch_export'] / 1000:,.0f} kB",
            f"{r['bytes']['onnx'] / 1000:,.0f} kB",
        ]
        for batch in (1, 32):
            ms = [f"{r['ms_per_image'][rt][f'batch_{batch}']:.3f} ms" for rt in RUNTIMES]
            cells = (head if batch == 1 else [""] * len(head)) + [str(batch), *ms]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: Conv4 models, 3 blocks")
    parser.add_argument("--repeats", type=int, default=25, help="timed blocks per measurement")
    parser.add_argument("--block-ms", type=float, default=100.0, help="length of a timed block")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where checkpoints live")
    parser.add_argument("--random-weights", action="store_true", help="ignore checkpoints")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deploy.json"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.block_ms = 3, 20.0

    results = []
    for name, role, backbone, checkpoint in MODELS:
        if args.quick and backbone[0] != "Conv4":
            continue
        path = (
            Path("/nonexistent")
            if args.random_weights
            else args.runs / Path(checkpoint).relative_to("runs")
        )
        result = measure(name, role, backbone, path, args)
        print(
            f"{name}: {result['ms_per_image']['onnxruntime']['batch_1']:.3f} ms/image "
            f"(onnxruntime, batch 1), weights {result['weights']}",
            file=sys.stderr,
        )
        results.append(result)

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
