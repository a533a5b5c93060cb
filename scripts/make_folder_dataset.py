#!/usr/bin/env python3
"""Write a few KanjiVG test characters as a folder of class folders of PNGs: a stand-in for a
user's own small labelled data set, to try ``metakd finetune`` on.

The characters come from the test split of the embedded KanjiVG data (radicals never seen in
meta-training, split with the data module's ``seed``), drawn as the data module draws them: white
strokes on black, 28x28 (the KanjiVG cache is rendered first if it is missing, 1-2 minutes once).
One folder per character, named ``U+XXXX-<character>``, holding ``--images`` PNG files.

Usage::

    python scripts/make_folder_dataset.py                        # 5 characters x 6 images
    python scripts/make_folder_dataset.py --classes 10 --same-radical --out runs/hard_kanji
    metakd finetune --config configs/kanji/finetune.yaml         # reads runs/my_kanji
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def folder_name(class_name: str) -> str:
    """``"kanji:U+8A9E"`` → ``"U+8A9E-語"``."""
    code = class_name.split(":")[-1]
    return f"{code}-{chr(int(code[2:], 16))}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", default="runs/my_kanji", help="the folder to write (default %(default)s)"
    )
    parser.add_argument("--classes", type=int, default=5, help="characters (default %(default)s)")
    parser.add_argument("--images", type=int, default=6, help="PNGs per character (of 20 drawings)")
    parser.add_argument(
        "--same-radical",
        action="store_true",
        help="take all characters from one radical group (look-alikes: harder)",
    )
    parser.add_argument("--seed", type=int, default=0, help="picks the characters and drawings")
    parser.add_argument("--cache-dir", default=None, help="KanjiVG cache folder (default ~/.cache)")
    opts = parser.parse_args(argv)  # fmt: skip

    from lightning_metakd.data import KanjiDataModule

    if opts.classes < 2 or not 1 <= opts.images <= 20:
        parser.error("--classes must be at least 2 and --images between 1 and 20.")
    dm = KanjiDataModule(cache_dir=opts.cache_dir)  # the default data set and split (seed 0)
    dm.prepare_data()
    dm.setup("test")
    test = dm.splits["test"]
    rng = np.random.default_rng(opts.seed)
    if opts.same_radical:
        groups = [m for m in test.groups.values() if len(m) >= opts.classes]
        if not groups:
            parser.error(f"no test radical group has {opts.classes} characters; lower --classes.")
        members = groups[rng.integers(len(groups))]
        classes = rng.choice(members, opts.classes, replace=False)
    else:
        classes = rng.choice(test.num_classes, opts.classes, replace=False)
    out = Path(opts.out)
    for c in sorted(int(c) for c in classes):
        folder = out / folder_name(test.class_names[c])
        folder.mkdir(parents=True, exist_ok=True)
        chosen = rng.choice(test.indices_by_class[c], opts.images, replace=False)
        for i, index in enumerate(sorted(int(k) for k in chosen)):
            pixels = test.images[index, 0].numpy()  # uint8 [H, W], white strokes on black
            Image.fromarray(pixels, mode="L").save(folder / f"{i:02d}.png")
    print(f"wrote {opts.classes} classes x {opts.images} images to {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
