#!/usr/bin/env python3
"""Draw docs/results/simple_characters.png: the simple characters beside the UCI digits.

Rows: kana and kanji components (``KanjiDataModule(simple_characters=6)``'s extra training
classes, :mod:`lightning_metakd.data.kanji_simple`) and synthetic glyphs
(``synthetic_characters``, :mod:`lightning_metakd.data.synthetic_glyphs`) as the mixed renderer
draws them, a few of the kanji they train beside, and the UCI digits (the real-handwriting test,
never trained on).

Usage::

    python scripts/simple_characters_picture.py [--out docs/results/simple_characters.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from lightning_metakd.data.handwriting import handwriting_dataset
from lightning_metakd.data.kanji import select_kanji
from lightning_metakd.data.kanji_handwriting import MixedConfig
from lightning_metakd.data.kanji_render import render_samples
from lightning_metakd.data.kanji_simple import simple_characters
from lightning_metakd.data.synthetic_glyphs import synthetic_glyphs

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = 12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/results/simple_characters.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kanji = select_kanji()
    simple = simple_characters(kanji, 6)
    kinds = {
        "kana (simple_characters, training only)": [k for k in simple if k.kind == "kana"],
        "kanji components (simple_characters, training only)": [
            k for k in simple if k.kind == "component"
        ],
        "synthetic glyphs (synthetic_characters, training only)": synthetic_glyphs(400),
        "kanji (the data set's classes)": kanji,
    }
    rows = {}
    for title, pool in kinds.items():
        picked = [pool[i * len(pool) // COLUMNS] for i in range(COLUMNS)]
        rows[title] = render_samples(picked, 1, MixedConfig(), progress=False)[:, 0] / 255.0
    digits = handwriting_dataset("sklearn_digits")
    first = [int(np.flatnonzero(np.asarray(digits.labels) == d)[0]) for d in range(10)]
    rows["UCI digits (the real-handwriting test, never trained on)"] = (
        digits.images[first, 0].numpy() / 255.0
    )
    fig, axes = plt.subplots(len(rows), COLUMNS, figsize=(COLUMNS * 0.9, len(rows) * 1.15))
    for r, (title, images) in enumerate(rows.items()):
        for c in range(COLUMNS):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(images):
                ax.imshow(images[c], cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(title, loc="left", fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.9, bottom=0.02, hspace=0.45, wspace=0.08)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
