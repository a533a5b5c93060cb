#!/usr/bin/env python3
"""Conv4 with channels-last weights against the NCHW layout of lightning-metakd 0.1, paired.

For Conv4-8, -16, -32 and -64 (the quickstart's and the study's widths), two ``MetaLearnerModule``
ProtoNet learners with the same weights, one ``Conv4(channels_last=True)`` (the default) and one
``Conv4(channels_last=False)``:

- ``train step``: ``training_step`` + ``backward`` + an Adam step on a 20-way 1-shot episode with
  5 queries per class (120 images of 28x28, the quickstart's and the study's training task);
- ``forward``: the embedding of a 5-way 1-shot test episode with 15 queries (80 images), without
  gradients (evaluation, and a cached teacher's pass over the training images).

The two layouts run in turns on the same inputs (the order swapped every repeat), so the ratios
(NCHW time / channels-last time: > 1 means channels-last is faster) are paired step by step;
reported as the median and interquartile range. glibc's malloc is tuned as training tunes it
(``tune_cpu_allocator``). ``max |Δ|``: the largest difference of the two
embeddings (float rounding, not a different function). Results: a Markdown table and ``--out``
JSON.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/conv_layout.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

from paired import quantiles, write_results

WIDTHS = (8, 16, 32, 64)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40, help="timed repeats per layout")
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/conv_layout.json"))
    opts = parser.parse_args()

    import torch

    from lightning_metakd.algorithms import ProtoNet
    from lightning_metakd.data.episode import Episode
    from lightning_metakd.models import Conv4
    from lightning_metakd.modules import MetaLearnerModule
    from lightning_metakd.modules.allocator import tune_cpu_allocator

    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.set_num_threads(1)
    tune_cpu_allocator()  # as MetaLearnerModule.setup does for training on CPU
    generator = torch.Generator().manual_seed(0)

    def episode(ways: int, queries: int) -> Episode:
        support = torch.rand(1, ways, 1, 28, 28, generator=generator)
        query = torch.rand(1, ways * queries, 1, 28, 28, generator=generator)
        labels = torch.arange(ways)
        return Episode(
            support, labels[None], query, labels.repeat_interleave(queries)[None], labels[None]
        )

    train, test = episode(20, 5), episode(5, 15)
    rows = []
    for width in opts.widths:
        modules = {}
        for layout in ("NCHW", "channels-last"):
            torch.manual_seed(width)
            backbone = Conv4(hidden=width, channels_last=layout == "channels-last")
            modules[layout] = MetaLearnerModule(backbone, ProtoNet(), ways=20)
        optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-3) for k, m in modules.items()}
        images = test.query_x[0]

        def train_step(layout: str, modules=modules, optimizers=optimizers) -> float:  # noqa: ANN001
            start = time.perf_counter()
            optimizers[layout].zero_grad()
            modules[layout].training_step(train, 0).backward()
            optimizers[layout].step()
            return time.perf_counter() - start

        def forward(layout: str, modules=modules, images=images) -> float:  # noqa: ANN001
            net = modules[layout].learner.model
            start = time.perf_counter()
            with torch.no_grad():
                net(images)
            return time.perf_counter() - start

        with torch.no_grad():
            nets = [modules[k].learner.model for k in ("NCHW", "channels-last")]
            difference = float((nets[0](images) - nets[1](images)).abs().max())
        for name, run in (("train step", train_step), ("forward", forward)):
            times: dict[str, list[float]] = {"NCHW": [], "channels-last": []}
            for _ in range(3):  # warm-up
                run("NCHW"), run("channels-last")
            for i in range(opts.repeats):
                order = ("NCHW", "channels-last") if i % 2 == 0 else ("channels-last", "NCHW")
                for layout in order:
                    times[layout].append(run(layout))
            ratios = [a / b for a, b in zip(times["NCHW"], times["channels-last"], strict=True)]
            q1, median, q3 = quantiles(ratios)
            rows.append({
                "width": width, "measure": name,
                "nchw_ms": 1000 * statistics.median(times["NCHW"]),
                "channels_last_ms": 1000 * statistics.median(times["channels-last"]),
                "speedup_median": median, "speedup_q1": q1, "speedup_q3": q3,
                "max_abs_difference": difference,
            })  # fmt: skip
            r = rows[-1]
            print(f"Conv4-{width} {name}: {r['nchw_ms']:.1f} → {r['channels_last_ms']:.1f} ms "
                  f"({median:.2f}×)", file=sys.stderr, flush=True)  # fmt: skip
    print(
        "\n| backbone | measure | NCHW (ms) | channels-last (ms) | speed-up, paired (IQR) | max |Δ| |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| Conv4-{r['width']} | {r['measure']} | {r['nchw_ms']:.1f} | "
              f"{r['channels_last_ms']:.1f} | {r['speedup_median']:.2f}× "
              f"({r['speedup_q1']:.2f}–{r['speedup_q3']:.2f}) | "
              f"{r['max_abs_difference']:.1e} |")  # fmt: skip
    write_results(opts.out, threads=torch.get_num_threads(), repeats=opts.repeats, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
