#!/usr/bin/env python3
"""What a distillation step costs over the undistilled student's step, paired in one process.

The default pair of ``configs/kanji/distill_protonet.yaml``: a Conv4-64 ProtoNet teacher and a
Conv4-16 ProtoNet student, 20-way 1-shot episodes with 5 queries per class (KanjiVG, within a
radical group), one task per step, one thread. Each variant's step is ``training_step`` +
``backward`` + an Adam step on the same episodes:

- ``student alone``: ``MetaLearnerModule`` (the undistilled twin);
- ``distillation, default``: ``DistillationModule`` with the config's terms (TaskLoss +
  SoftLabels) and the default ``teacher_normalization="auto"``, which in ``fit`` gives this
  metric teacher population statistics, so that its per-image embeddings are cached
  (``distill/cache.py``); timed with the cache warm (every image seen before: later epochs) and
  cold (no image seen before: the first epoch's worst case);
- ``distillation, teacher's own normalisation``: ``teacher_normalization=None`` (the default of
  lightning-metakd 0.1): the transductive teacher adapts and embeds every task;
- ``... , bf16 teacher``: that with ``teacher_precision="bf16"``.

Steps of the variants run in turns (the order rotated every step) so they share the machine's
conditions; ratios are per-step paired (variant / student alone in the same turn), reported as
the median and interquartile range. Results: a Markdown table and ``--out`` JSON.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/distill_step.py [--teacher <Conv4-64 ProtoNet best.ckpt>]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
import time
import warnings
from pathlib import Path

from paired import quantiles, write_results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--teacher", default=None, help="a Conv4-64 ProtoNet checkpoint (default: random weights)"
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_step.json"))
    opts = parser.parse_args()

    import torch

    from lightning_metakd.algorithms import Learner, ProtoNet
    from lightning_metakd.data import KanjiDataModule
    from lightning_metakd.distill import SoftLabels, TaskLoss
    from lightning_metakd.models import Conv4
    from lightning_metakd.modules import DistillationModule, MetaLearnerModule, load_learner

    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.set_num_threads(1)
    data = KanjiDataModule(ways=20, shots=1, queries=5, meta_batch_size=1, grouping="radical",
                           steps_per_epoch=opts.steps + 2)  # fmt: skip
    data.prepare_data()
    data.setup("fit")
    episodes = list(itertools.islice(iter(data.train_dataloader()), opts.steps + 2))
    torch.manual_seed(0)
    teacher = (
        load_learner(opts.teacher) if opts.teacher else Learner(Conv4(hidden=64), ProtoNet(), 20)
    )

    def distiller(teacher=teacher, **kwargs):  # noqa: ANN001, ANN202
        torch.manual_seed(1)
        return DistillationModule(teacher, Conv4(hidden=16), ProtoNet(), ways=20,
                                  terms=[TaskLoss(), SoftLabels(temperature=4.0)],
                                  init_from_teacher=True, **kwargs)  # fmt: skip

    population = copy.deepcopy(teacher)
    population.normalization = "population"
    population.calibrate(data.calibration_images())
    torch.manual_seed(1)
    own = {"teacher_normalization": None}
    variants = {
        "student alone": MetaLearnerModule(Conv4(hidden=16), ProtoNet(), ways=20),
        # the default outside fit keeps the teacher's policy; fit's "auto" is this population one
        "distillation, default (cached teacher, warm)": distiller(teacher=population),
        "distillation, default (cached teacher, cold)": distiller(teacher=population),
        "distillation, teacher's own normalisation": distiller(**own),
        "distillation, teacher's own normalisation, bf16 teacher": distiller(
            teacher_precision="bf16", **own
        ),
    }
    warm = variants["distillation, default (cached teacher, warm)"]
    for episode in episodes:  # every image of the timed episodes seen once before
        warm.episode_loss(episode)
    optimizers = {n: torch.optim.Adam(m.parameters(), lr=1e-3) for n, m in variants.items()}

    def step(name: str, episode) -> float:
        module, optimizer = variants[name], optimizers[name]
        if name.endswith("cold)"):
            for cache in module._caches:  # no image seen before
                if cache is not None and cache.filled is not None:
                    cache.filled.zero_()
        start = time.perf_counter()
        optimizer.zero_grad()
        module.training_step(episode, 0).backward()
        optimizer.step()
        return time.perf_counter() - start

    names = list(variants)
    for name in names:  # warm-up
        step(name, episodes[0])
        step(name, episodes[1])
    times: dict[str, list[float]] = {n: [] for n in names}
    for i, episode in enumerate(episodes[2:]):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            times[name].append(step(name, episode))
    base = times["student alone"]
    rows = []
    for name in names:
        ratios = [t / b for t, b in zip(times[name], base, strict=True)]
        q1, median, q3 = quantiles(ratios)
        rows.append({"variant": name, "median_ms": 1000 * statistics.median(times[name]),
                     "ratio_median": median, "ratio_q1": q1, "ratio_q3": q3})  # fmt: skip
    print("\n| variant | median step (ms) | vs student alone, paired (IQR) |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['median_ms']:.1f} | {r['ratio_median']:.2f}× "
              f"({r['ratio_q1']:.2f}–{r['ratio_q3']:.2f}) |")  # fmt: skip
    write_results(opts.out, teacher=opts.teacher or "random Conv4-64", steps=opts.steps, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
