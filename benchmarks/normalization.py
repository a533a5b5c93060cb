#!/usr/bin/env python3
"""Each normalisation policy on the same fixed KanjiVG test episodes, paired against transductive.

For every checkpoint given (``NAME=PATH``; a distillation checkpoint gives its student) the learner
is evaluated under each policy of :data:`lightning_metakd.algorithms.POLICIES` — the policy it was
trained with stays what it was; only the statistics its BatchNorm layers normalise *test* episodes
with change — on the 600 fixed within-radical test episodes of ``--config`` (5-way, and 10-way
for learners without a 5-way head), with the paired per-episode difference against the
transductive row of the same learner (``lightning_metakd.report.compare``). ``population``
statistics are estimated from 32 fixed meta-training tasks (``calibration_images``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/normalization.py \\
        --checkpoint "Conv4-64 ProtoNet=runs/kanji-protonet/version_0/checkpoints/best.ckpt" \\
        --checkpoint "Conv4-64 MAML=runs/kanji-maml/version_0/checkpoints/best.ckpt" \\
        --checkpoint "Conv4-16 student=runs/kanji-distill-protonet/version_0/checkpoints/best.ckpt"

Prints a Markdown table per test shape and writes ``benchmarks/results/normalization.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

POLICIES = ("transductive", "support", "population")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--config", default="configs/kanji/distill_protonet.yaml",
                        help="the LightningCLI config whose data: gives the test episodes")  # fmt: skip
    parser.add_argument("--ways", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/normalization.json"))
    opts = parser.parse_args()

    import torch

    from lightning_metakd.modules import read_checkpoint
    from lightning_metakd.report import compare, report_datamodule

    torch.set_num_threads(1)
    data_config = yaml.safe_load(Path(opts.config).read_text())["data"]
    learners = {}
    for spec in opts.checkpoint:
        name, _, path = spec.partition("=")
        learners[name] = (read_checkpoint(path).learner(), path)
    results: dict = {"config": opts.config, "date": time.strftime("%Y-%m-%d"), "tables": {}}
    for ways in opts.ways:
        config = copy.deepcopy(data_config)
        config.setdefault("init_args", {})["test_ways"] = ways
        datamodule = report_datamodule(config)
        datamodule.prepare_data()
        datamodule.setup("fit")
        calibration = datamodule.calibration_images()
        rows_by_learner = {}
        for name, (learner, path) in learners.items():
            if learner.algorithm.needs_head and learner.ways != ways:
                continue  # a MAML head is N-way: a 10-way test needs a 10-way learner
            variants = {}
            for policy in POLICIES:
                variant = copy.deepcopy(learner)
                variant.normalization = policy
                if policy == "population":
                    variant.calibrate(calibration)
                variants[f"{name} [{policy}]"] = variant
            with tempfile.TemporaryDirectory() as out:
                rows = compare(variants, datamodule, out, warmup=0, repeats=1, plot=False,
                               reference=f"{name} [transductive]")  # fmt: skip
            rows_by_learner[name] = {"checkpoint": path, "rows": rows}
        results["tables"][f"{ways}-way 1-shot"] = rows_by_learner
        print(f"\n### {ways}-way 1-shot within a radical group, 600 fixed episodes\n")
        print(
            "| learner (trained with) | transductive | support (Δ paired) | population (Δ paired) |"
        )
        print("|---|---:|---:|---:|")
        for name, entry in rows_by_learner.items():
            cells = []
            for row in entry["rows"]:
                acc = f"{100 * row['accuracy']:.2f} ± {100 * row['ci95']:.2f}"
                if row["diff_vs_reference"] is not None:
                    acc += (
                        f" ({100 * row['diff_vs_reference']:+.2f} ± {100 * row['diff_ci95']:.2f})"
                    )
                cells.append(acc)
            trained = learners[name][0].normalization
            print(f"| {name} ({trained}) | " + " | ".join(cells) + " |")
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwritten {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
