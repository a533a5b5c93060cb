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

The exported learner (``metakd export --learner``: the adaptation itself, ``enrol`` and
``classify`` graphs, support statistics baked in) of the distilled Conv4-16 ProtoNet student and
its Conv4-64 teacher, on the KanjiVG episodes of ``--config`` (5-way 1-shot within a radical):

- parity: on the first 100 fixed test episodes, exported enrol + classify against
  ``learner.adapt`` + ``learner.predict`` (same policy): max |Δlogits| and identical argmax, for
  the student as ProtoNet and, on the student's trained backbone, as MatchingNet and as ANIL (a
  head adapted by 3 closed-form inner steps in the graph);
- accuracy on all 600 fixed test episodes (± 95% CI, and the paired difference against eager
  PyTorch), file size, enrol latency per support set (5-way 1-shot and 5-shot) and classify latency
  per image (batch 1 and 32) for eager PyTorch (``learner.adapt``/``predict``), the torch.export
  programs, ONNX Runtime fp32 and int8 (static QDQ, calibrated on 32 meta-training tasks, weights
  per channel or per tensor), all in the same run.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/deploy.py
    OMP_NUM_THREADS=1 python benchmarks/deploy.py --quick   # smoke run: Conv4 models, 3 blocks
    OMP_NUM_THREADS=1 python benchmarks/deploy.py --only learner \
        --student runs/kanji-distill-protonet/version_0/checkpoints/best.ckpt \
        --teacher runs/kanji-protonet/version_0/checkpoints/best.ckpt
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


# -- the exported learner ---------------------------------------------------------------------------
def test_tasks(datamodule) -> list[tuple[torch.Tensor, ...]]:
    """The fixed test episodes as ``(support_x, support_y, query_x, query_y)`` tasks, in order."""
    out = []
    for batch in datamodule.test_dataloader():
        for t in range(len(batch.support_x)):
            out.append((batch.support_x[t], batch.support_y[t], batch.query_x[t], batch.query_y[t]))
    return out


def parity(learner, name: str, episodes, frozen_body: bool = False) -> dict:
    """Exported enrol + classify against learner.adapt + predict on ``episodes``, both formats."""
    from lightning_metakd.deploy.exported_learner import load_exported_learner
    from lightning_metakd.deploy.learner_export import export_learner

    with tempfile.TemporaryDirectory() as tmp:
        export_learner(learner, tmp, ("onnx", "torch_export"), frozen_body=frozen_body)
        row: dict = {"learner": name, "episodes": len(episodes)}
        for fmt in ("onnx", "torch_export"):
            runner = load_exported_learner(tmp, fmt, threads=1)
            delta, same, queries = 0.0, 0, 0
            for support_x, support_y, query_x, _ in episodes:
                expected = learner.predict(learner.adapt(support_x, support_y, "support"), query_x)
                logits = runner.classify(runner.enrol(support_x, support_y), query_x)
                delta = max(delta, float((logits - expected).abs().max()))
                same += int((logits.argmax(-1) == expected.argmax(-1)).sum())
                queries += len(query_x)
            row[fmt] = {"max_abs_diff": delta, "argmax_identical": f"{same}/{queries}"}
    return row


def accuracy(predict, episodes) -> list[float]:
    """Per-episode query accuracy of ``predict(support_x, support_y, query_x) -> logits``."""
    return [
        float((predict(sx, sy, qx).argmax(-1) == qy).float().mean()) for sx, sy, qx, qy in episodes
    ]


def summary(per_episode: list[float], reference: list[float] | None) -> dict:
    """Mean accuracy ± 95% CI and, with a reference, the paired difference ± 95% CI."""
    n = len(per_episode)
    mean = statistics.fmean(per_episode)
    row = {"accuracy": mean, "ci95": 1.96 * statistics.pstdev(per_episode) / n**0.5}
    if reference is not None:
        diffs = [a - b for a, b in zip(per_episode, reference, strict=True)]
        row["diff_vs_eager"] = statistics.fmean(diffs)
        row["diff_ci95"] = 1.96 * statistics.pstdev(diffs) / n**0.5
    return row


def learner_runtimes(learner, tmp: Path, calibration, policy: str) -> dict:
    """``{runtime: (enrol(sx, sy) -> state, classify(state, qx) -> logits, bytes)}`` under ``policy``."""
    from lightning_metakd.deploy.exported_learner import load_exported_learner
    from lightning_metakd.deploy.learner_export import export_learner
    from lightning_metakd.deploy.quantize import quantize_learner

    report = export_learner(learner, tmp, ("onnx", "torch_export"), normalization=policy)
    runtimes = {
        "eager": (
            lambda sx, sy: learner.adapt(sx, sy, policy),
            learner.predict,
            None,
        )
    }
    for fmt, label in (("torch_export", "torch.export"), ("onnx", "onnxruntime fp32")):
        runner = load_exported_learner(tmp, fmt, threads=1)
        runtimes[label] = (runner.enrol, runner.classify, sum(report["bytes"][fmt].values()))
    for per_channel in (True, False):
        out = tmp / ("int8" if per_channel else "int8-per-tensor")
        quantized = quantize_learner(tmp, calibration, out, per_channel=per_channel)
        runner = load_exported_learner(out, threads=1)
        label = "onnxruntime int8" + ("" if per_channel else " (per-tensor weights)")
        runtimes[label] = (runner.enrol, runner.classify, quantized["bytes"])
    return runtimes


def latency(enrol, classify, episode, queries: torch.Tensor, args) -> dict:
    """Enrol milliseconds per support set (the episode's 1-shot set, and its queries as 5 shots),
    classify milliseconds per image at batch 1 and 32."""
    support_x, support_y, query_x, query_y = episode
    ways = int(support_y.max()) + 1
    five_shot = (query_x[: 5 * ways], query_y[: 5 * ways])
    state = enrol(support_x, support_y)
    return {
        "enrol_ms": {
            f"{ways}-way 1-shot": 1000 * seconds_per_call(
                lambda: enrol(support_x, support_y), args.repeats, args.block_ms),
            f"{ways}-way 5-shot": 1000 * seconds_per_call(
                lambda: enrol(*five_shot), args.repeats, args.block_ms),
        },
        "classify_ms_per_image": {
            f"batch_{b}": 1000 / b * seconds_per_call(
                lambda b=b: classify(state, queries[:b]), args.repeats, args.block_ms)
            for b in (1, 32)
        },
    }  # fmt: skip


def measure_learner(name: str, learner, policy: str, episodes, calibration, args) -> dict:
    """Accuracy on ``episodes``, size, enrol and classify latency of every runtime of ``learner``."""
    queries = torch.cat([q for _, _, q, _ in episodes[:3]])[:32].contiguous()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = learner_runtimes(learner, Path(tmp), calibration, policy)
        reference = None
        for runtime, (enrol, classify, size) in runtimes.items():
            row = {"learner": name, "runtime": runtime, "bytes": size}
            per_episode = accuracy(
                lambda sx, sy, qx, e=enrol, c=classify: c(e(sx, sy), qx), episodes
            )
            row |= summary(per_episode, reference)
            reference = reference or per_episode  # eager comes first
            row |= latency(enrol, classify, episodes[0], queries, args)
            print(f"{name} [{policy}] / {runtime}: {100 * row['accuracy']:.2f}%", file=sys.stderr)
            rows.append(row)
    return {"learner": name, "normalization": policy,
            "parameters": sum(p.numel() for p in learner.parameters()), "rows": rows}  # fmt: skip


def learner_section(args) -> dict:
    """Parity, then accuracy / size / latency of the exported student (and teacher)."""
    import copy

    from lightning_metakd.algorithms import ANIL, Learner, MatchingNet
    from lightning_metakd.deploy.learner_export import calibration_learner
    from lightning_metakd.deploy.quantize import calibration_datamodule, calibration_tasks
    from lightning_metakd.modules import load_learner

    datamodule = calibration_datamodule(args.config)
    datamodule.setup("test")
    episodes = test_tasks(datamodule)
    if args.quick:
        episodes = episodes[:20]
    calibration = calibration_tasks(datamodule)
    student = load_learner(args.student)
    backbone = student.backbone
    matching = Learner(copy.deepcopy(backbone), MatchingNet(), ways=5).eval()
    torch.manual_seed(0)
    anil = Learner(copy.deepcopy(backbone), ANIL(inner_lr=0.4, inner_steps=1, inner_steps_test=3),
                   ways=5).eval()  # fmt: skip
    parities = [
        parity(student, "Conv4-16 student, ProtoNet", episodes[:100]),
        parity(matching, "Conv4-16 student backbone, MatchingNet", episodes[:100]),
        parity(
            anil, "Conv4-16 student backbone, ANIL (3 inner steps in the graph)", episodes[:100]
        ),
    ]
    learners = [("Conv4-16 ProtoNet, distilled (student)", student)]
    if args.teacher and Path(args.teacher).is_file():
        learners.append(("Conv4-64 ProtoNet (teacher)", load_learner(args.teacher)))
    measured = []
    for name, learner in learners:  # support statistics, then population statistics folded in
        population = calibration_learner(learner, datamodule)
        for policy, variant in (("support", learner), ("population", population)):
            measured.append(measure_learner(name, variant, policy, episodes, calibration, args))
    return {
        "config": args.config,
        "episodes": len(episodes),
        "student": str(args.student),
        "teacher": str(args.teacher),
        "calibration_tasks": len(calibration),
        "parity": parities,
        "learners": measured,
    }


def learner_tables(section: dict) -> str:
    """Markdown: the parity table and the accuracy / size / latency table."""
    lines = [
        f"Parity on {section['parity'][0]['episodes']} fixed test episodes (exported enrol + "
        "classify vs learner.adapt + learner.predict, support statistics):",
        "",
        r"| learner | ONNX max \|Δlogits\| | ONNX argmax identical | torch.export max "
        r"\|Δlogits\| | torch.export argmax identical |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in section["parity"]:
        lines.append(
            f"| {r['learner']} | {r['onnx']['max_abs_diff']:.1e} | {r['onnx']['argmax_identical']} "
            f"| {r['torch_export']['max_abs_diff']:.1e} | {r['torch_export']['argmax_identical']} |"
        )
    lines += [
        "",
        f"Accuracy on {section['episodes']} fixed test episodes, size of enrol + classify, "
        "latency (1 thread):",
        "",
        "| learner | statistics | runtime | accuracy | Δ vs eager (paired) | files "
        "| enrol 5-way 1-shot | enrol 5-way 5-shot | classify, batch 1 | classify, batch 32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for learner in section["learners"]:
        for r in learner["rows"]:
            diff = (
                f"{100 * r['diff_vs_eager']:+.2f} ± {100 * r['diff_ci95']:.2f}"
                if "diff_vs_eager" in r
                else "—"
            )
            size = "—" if r["bytes"] is None else f"{r['bytes'] / 1000:,.0f} kB"
            enrol = list(r["enrol_ms"].values())
            classify = r["classify_ms_per_image"]
            lines.append(
                f"| {learner['learner']} | {learner['normalization']} | {r['runtime']} | "
                f"{100 * r['accuracy']:.2f} ± "
                f"{100 * r['ci95']:.2f} | {diff} | {size} | {enrol[0]:.2f} ms | {enrol[1]:.2f} ms "
                f"| {classify['batch_1']:.3f} ms | {classify['batch_32']:.3f} ms |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: Conv4 models, 3 blocks")
    parser.add_argument("--repeats", type=int, default=25, help="timed blocks per measurement")
    parser.add_argument("--block-ms", type=float, default=100.0, help="length of a timed block")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="where checkpoints live")
    parser.add_argument("--random-weights", action="store_true", help="ignore checkpoints")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deploy.json"))
    parser.add_argument("--only", choices=["classifier", "learner"], default=None,
                        help="run one part; the other's results in --out are kept")  # fmt: skip
    parser.add_argument("--student", type=Path,
                        default=Path("runs/kanji-distill-protonet/version_0/checkpoints/best.ckpt"))  # fmt: skip
    parser.add_argument("--teacher", type=Path,
                        default=Path("runs/kanji-protonet/version_0/checkpoints/best.ckpt"))  # fmt: skip
    parser.add_argument("--config", default="configs/kanji/distill_protonet.yaml",
                        help="its data: gives the test episodes and the calibration tasks")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.block_ms = 3, 20.0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    previous = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}

    results = previous.get("results", [])
    if args.only != "learner":
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
    learner = previous.get("learner")
    if args.only != "classifier" and args.student.is_file():
        learner = learner_section(args)

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "onnxruntime": __import__("onnxruntime").__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "results": results,
        "learner": learner,
    }
    if args.only and previous:
        report["kept_from_previous_run"] = {
            "command": previous.get("command"),
            "part": "learner" if args.only == "classifier" else "classifier",
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if results:
        print(table(results))
    if learner:
        print()
        print(learner_tables(learner))


if __name__ == "__main__":
    main()
