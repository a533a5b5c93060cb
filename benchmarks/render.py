"""KanjiVG render speed: the classic renderer against Pillow's own curve-joint polyline.

Both sides draw the same drawings (``--characters`` of the default selection, spread over it, x
``--samples`` each, one process) and must give the same bytes (checked every run):

- **ours**: :func:`~lightning_metakd.data.kanji_render.render_kanji` as shipped — every cubic
  segment of a character evaluated in one product (``chain_polylines``) and the pen's round bends
  drawn straight through Pillow's drawing object (``round_joint_line``);
- **Pillow**: the same function with both swapped back for what the renderer did before
  2026-12-03 — one Bernstein product per chain and ``ImageDraw.line(..., joint="curve")``, whose
  Python wrappers run three times per bend.

Each run renders the whole set once per side, in alternating order (paired: the machine's load
hits both alike); a cell is the median over ``--runs`` runs after a warm-up. The ratio is
Pillow's median time over ours.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/render.py                  # table + benchmarks/results/render.json
    OMP_NUM_THREADS=1 python benchmarks/render.py --runs 9 --out /tmp/render.json
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import ImageDraw

from lightning_metakd.data import kanji_render
from lightning_metakd.data.kanji import select_kanji
from lightning_metakd.data.kanji_render import RenderConfig, bernstein, render_samples


def _per_chain_polylines(
    points: np.ndarray, lengths: tuple[int, ...], samples: int
) -> list[list[tuple[float, float]]]:
    """The polylines one chain at a time (the renderer before ``chain_polylines``)."""
    basis, start, lines = bernstein(samples), 0, []
    for length in lengths:
        chain = points[start : start + length]
        start += length
        if length >= 4:
            segments = np.stack([chain[0:-1:3], chain[1::3], chain[2::3], chain[3::3]], axis=1)
            line = (basis @ segments).reshape(-1, 2)
        else:
            line = chain
        lines.append([tuple(p) for p in line.tolist()])
    return lines


def _pillow_line(draw: ImageDraw.ImageDraw, xy: list[tuple[float, float]], width: int) -> None:
    draw.line(xy, fill=255, width=width, joint="curve")


@contextlib.contextmanager
def pillow_side() -> Iterator[None]:
    """The renderer with Pillow's polyline and per-chain curves, restored afterwards."""
    saved = kanji_render.round_joint_line, kanji_render.chain_polylines
    kanji_render.round_joint_line = _pillow_line
    kanji_render.chain_polylines = _per_chain_polylines
    try:
        yield
    finally:
        kanji_render.round_joint_line, kanji_render.chain_polylines = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--characters", type=int, default=300)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "render.json"))
    opts = parser.parse_args()
    selection = select_kanji(10, None, None)
    chosen = selection[:: max(1, len(selection) // opts.characters)][: opts.characters]
    config = RenderConfig()

    def side(pillow: bool) -> tuple[float, str]:
        with pillow_side() if pillow else contextlib.nullcontext():
            start = time.perf_counter()
            images = render_samples(chosen, opts.samples, config, progress=False)
            seconds = time.perf_counter() - start
        return seconds, hashlib.sha256(images.tobytes()).hexdigest()

    side(False), side(True)  # warm-up: imports, caches
    times: dict[str, list[float]] = {"ours": [], "pillow": []}
    for run in range(opts.runs):
        order = [False, True] if run % 2 == 0 else [True, False]
        digests = {}
        for pillow in order:
            seconds, digests[pillow] = side(pillow)
            times["pillow" if pillow else "ours"].append(seconds)
        if digests[False] != digests[True]:
            raise SystemExit("The two renderers drew different images: not a fair comparison.")
    images = len(chosen) * opts.samples
    median = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "what": "classic KanjiVG render, one process: ours vs Pillow's curve-joint polyline",
        "images": images,
        "runs": opts.runs,
        "seconds": times,
        "median_seconds": median,
        "images_per_second": {k: images / v for k, v in median.items()},
        "ratio_pillow_over_ours": median["pillow"] / median["ours"],
        "same_bytes": True,
        "machine": platform.processor() or platform.machine(),
    }
    print(f"| renderer | images/s (median of {opts.runs}) | seconds for {images:,} images |")
    print("|---|---:|---:|")
    for name in ("pillow", "ours"):
        print(f"| {name} | {result['images_per_second'][name]:,.0f} | {median[name]:.2f} |")
    print(f"\nours is {result['ratio_pillow_over_ours']:.2f}x faster, the same bytes")
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
