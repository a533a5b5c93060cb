#!/usr/bin/env python3
"""Ablation of the distillation terms on KanjiVG: each term alone, θ* alone, and all together.

Every run distils the Conv4-64 ProtoNet teacher of ``configs/kanji/protonet.yaml`` into a Conv4-16
ProtoNet student with ``configs/kanji/distill_protonet.yaml`` (6 epochs of 250 20-way 1-shot
within-radical episodes) and changes only the distillation terms and ``init_from_teacher``; the student is
then tested on the same 600 fixed within-radical episodes, 5-way and 10-way 1-shot. ``task only``
(the task loss alone, random initialisation) is the undistilled twin inside the same module.

Each training run is a real ``metakd fit`` in a subprocess (``--jobs`` at a time, one thread each);
runs whose ``best.ckpt`` exists are not retrained. Results: a Markdown table per test shape on
stdout and in ``--out`` (JSON).

Usage::

    metakd fit --config configs/kanji/protonet.yaml        # the teacher, once
    OMP_NUM_THREADS=1 python scripts/kanji_ablation.py --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CONFIG = "configs/kanji/distill_protonet.yaml"
#: The terms of the variants, by short name (the task loss is always on, weight 1).
TERMS = {
    "task": ("TaskLoss", {"weight": 1.0}),
    "soft": ("SoftLabels", {"weight": 1.0, "temperature": 4.0}),
    "features": ("FeatureHints", {"weight": 1.0}),
    "attention transfer": ("AttentionTransfer", {"weight": 1.0}),
    "anchor": ("ParameterAnchor", {"weight": 0.01}),
}
#: run name -> (the terms besides the task loss, init_from_teacher).
VARIANTS: dict[str, tuple[tuple[str, ...], bool]] = {
    "task only (undistilled)": ((), False),
    "θ* init (sliced teacher)": ((), True),
    "soft labels": (("soft",), False),
    "features (FitNets)": (("features",), False),
    "attention transfer": (("attention transfer",), False),
    "θ* init + anchor": (("anchor",), True),
    "θ* init + soft labels (default config)": (("soft",), True),
    "all terms": (("soft", "features", "attention transfer", "anchor"), True),
}


def variant_args(name: str) -> dict:
    """The ``model.init_args`` a variant sets: its ``terms`` (YAML/JSON) and ``init_from_teacher``."""
    names, init = VARIANTS[name]
    terms = [
        {"class_path": f"lightning_metakd.distill.{TERMS[t][0]}", "init_args": TERMS[t][1]}
        for t in ("task", *names)
    ]
    return {"terms": terms, "init_from_teacher": init}


TESTS = {"5-way 1-shot": 5, "10-way 1-shot": 10}


def slug(name: str) -> str:
    keep = "".join(c if c.isalnum() else "-" for c in name.lower().replace("θ*", "theta"))
    return "-".join(part for part in keep.split("-") if part)


def checkpoint(root: Path, name: str) -> Path:
    return root / "kanji-ablation" / slug(name) / "checkpoints" / "best.ckpt"


def fit(root: Path, name: str) -> Path:
    """Train one variant with the real command (skipped when its best.ckpt exists)."""
    ckpt = checkpoint(root, name)
    if ckpt.exists():
        print(f"[ablation] {name}: {ckpt} exists, not retrained", flush=True)
        return ckpt
    args = [sys.executable, "-m", "lightning_metakd.cli", "fit", "--config", CONFIG]
    for key, value in variant_args(name).items():
        args += [f"--model.init_args.{key}", json.dumps(value)]
    args += [
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.logger.init_args.name", "kanji-ablation",
        "--trainer.logger.init_args.version", slug(name),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    print(f"[ablation] {name}: training", flush=True)
    log = root / "kanji-ablation" / f"{slug(name)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        subprocess.run(args, check=True, env=env, stdout=handle, stderr=subprocess.STDOUT)
    print(f"[ablation] {name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    return ckpt


def test(ckpt: Path, ways: int) -> dict[str, float]:
    """The student of ``ckpt`` on the config's 600 fixed test episodes with ``ways`` classes."""
    import lightning as L
    import yaml

    from lightning_metakd.data import KanjiDataModule
    from lightning_metakd.modules import DistillationModule

    data_args = yaml.safe_load(Path(CONFIG).read_text())["data"]["init_args"]
    data = KanjiDataModule(**{**data_args, "test_ways": ways})
    model = DistillationModule.load_from_checkpoint(ckpt)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return {k: float(v) for k, v in trainer.test(model, data, verbose=False)[0].items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs"), help="where the runs go")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/kanji_ablation.json"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these variant names")
    opts = parser.parse_args()
    names = [n for n in VARIANTS if opts.only is None or n in opts.only]
    with ThreadPoolExecutor(max_workers=opts.jobs) as pool:
        ckpts = dict(zip(names, pool.map(lambda n: fit(opts.root, n), names), strict=True))

    from lightning_metakd.report import ablation

    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, ways in TESTS.items():
        results[label] = {name: test(ckpt, ways) for name, ckpt in ckpts.items()}
        print(f"\n### {label}, within a radical group (600 fixed episodes)\n")
        print(ablation(results[label], baseline=names[0]))
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "config": CONFIG,
        "variants": {n: variant_args(n) for n in names},
        "results": results,
        "date": time.strftime("%Y-%m-%d"),
    }
    opts.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwritten {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
