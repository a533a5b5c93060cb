"""A sheet of images with their predicted and true classes, the wrong predictions framed in red.

``metakd finetune`` writes one for the held-out images next to ``finetune.json``
(:data:`SHEET_FILE`, ``holdout.png``); ``metakd classify --sheet out.png`` writes one for the
classified files (:func:`classify_sheet`), with the true class wherever a file's parent folder is
named after a class. A glance shows which classes the classifier confuses, and whether the
images it was shown are the images you meant.

Example::

    sheet = prediction_sheet("sheet.png", ["a/1.png", "b/2.png"], ["a", "a"], [0.9, 0.6],
                             true=["a", "b"])
    sheet.wrong  # [1]: b/2.png was taken for an "a"
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from lightning_metakd.callbacks.tensorboard import (
    WRONG,
    Picture,
    fit_text,
    labelled_grid,
    text_width,
)

#: The sheet ``metakd finetune`` writes next to ``finetune.json``.
SHEET_FILE = "holdout.png"


class Sheet(NamedTuple):
    """A written prediction sheet."""

    path: Path  #: the PNG
    picture: Picture  #: what was drawn (tiles indexed ``(row, column)``)
    shown: list[int]  #: indices into the given files, in the order drawn (row by row)
    wrong: list[int]  #: indices of the files framed in red (predicted ≠ true)
    summary: str  #: the sheet's summary line, e.g. ``"9/12 correct (75.0%), 3 wrong in red"``


def thumbnail(path: str | Path, side: int) -> Tensor:
    """An image file as a ``[3, side, side]`` tile in ``[0, 1]``, aspect kept, padded light grey.

    Small images (a 28 px kanji) are enlarged by a whole factor without smoothing, so their
    pixels stay sharp; large ones (a photo) are reduced with antialiasing.
    """
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    factor = side / max(image.size)
    if factor >= 2:
        whole = int(factor)
        image = image.resize((image.width * whole, image.height * whole), Image.Resampling.NEAREST)
    image = ImageOps.pad(image, (side, side), Image.Resampling.LANCZOS, color=(230, 230, 230))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def folder_classes(files: Sequence[str | Path], class_names: Sequence[str]) -> list[str | None]:
    """The true class of each file where its parent folder is named after a class, else None.

    Example:
        >>> folder_classes(["cats/1.png", "x/2.png", "dogs/3.png"], ["cats", "dogs"])
        ['cats', None, 'dogs']
    """
    names = set(class_names)
    return [Path(f).parent.name if Path(f).parent.name in names else None for f in files]


def _chosen(wrong: list[int], count: int, limit: int) -> list[int]:
    """Up to ``limit`` of ``range(count)``: every wrong one first, then the rest, in order."""
    if count <= limit:
        return list(range(count))
    wrong_set = set(wrong[:limit])
    rest = [i for i in range(count) if i not in wrong_set][: limit - len(wrong_set)]
    return sorted(wrong_set | set(rest))


def _line(prefix: str, name: str, suffix: str, width: int) -> str:
    """``prefix + name + suffix`` in ``width`` pixels, cutting the name (never the probability)."""
    room = width - text_width(prefix + suffix)
    return prefix + fit_text(name, max(room, 1)) + suffix


def summary_line(true: Sequence[str | None], wrong: Sequence[int], shown: int) -> str:
    """What the sheet's title says of all the files: correct / known, wrong, unknown, shown.

    Example:
        >>> summary_line(["a", "b", None], wrong=[1], shown=3)
        '1/2 correct (50.0%), 1 wrong in red; 1 without a true class'
    """
    count = len(true)
    known = sum(t is not None for t in true)
    if known:
        correct = known - len(wrong)
        text = (
            f"{correct}/{known} correct ({100 * correct / known:.1f}%), {len(wrong)} wrong in red"
        )
        if known < count:
            text += f"; {count - known} without a true class"
    else:
        text = f"{count} images, true class unknown (no parent folder is named after a class)"
    if shown < count:
        text += f"; showing {shown} of {count}, every wrong one first"
    return text


def prediction_sheet(
    path: str | Path,
    files: Sequence[str | Path],
    predicted: Sequence[str],
    probabilities: Sequence[float] | None = None,
    true: Sequence[str | None] | None = None,
    title: str = "",
    columns: int = 8,
    max_images: int = 96,
    side: int = 112,
    show_files: bool = False,
) -> Sheet:
    """Write a PNG grid of ``files``, each captioned with its predicted (and true) class.

    Each tile's caption is ``<predicted class> <probability>`` and, where the true class is known,
    ``true <class>``; a prediction that differs from a known true class gets a red frame and a red
    caption. With more than ``max_images`` files every wrong one is shown first, then the others
    in order, and the title says how many are shown.

    Args:
        path: the PNG to write (folders created).
        files: the image files, in order.
        predicted: the predicted class name of each file.
        probabilities: the probability of each prediction (softmax), shown as a percentage.
        true: the true class name of each file, ``None`` where unknown (see
            :func:`folder_classes`).
        title: a first line above the summary line the sheet writes itself.
        columns: tiles per row.
        max_images: the most tiles drawn.
        side: tile size in pixels.
        show_files: put each file's name above its prediction.

    Raises:
        ValueError: lengths that do not match, or a bad ``columns``/``max_images``.
    """
    count = len(files)
    lengths = {"predicted": len(predicted)}
    lengths |= {} if probabilities is None else {"probabilities": len(probabilities)}
    lengths |= {} if true is None else {"true": len(true)}
    if any(n != count for n in lengths.values()):
        raise ValueError(
            f"prediction_sheet needs one entry per file ({count} files), got {lengths}."
        )
    if count == 0 or columns < 1 or max_images < 1:
        raise ValueError(
            f"prediction_sheet needs at least one file, columns >= 1 and max_images >= 1; got "
            f"{count} files, columns={columns}, max_images={max_images}."
        )
    true = [None] * count if true is None else list(true)
    wrong = [i for i in range(count) if true[i] is not None and predicted[i] != true[i]]
    shown, wrong_set = _chosen(wrong, count, max_images), set(wrong)
    summary = summary_line(true, wrong, len(shown))
    legend = "caption: " + ("file, " if show_files else "") + "predicted class"
    legend += (" (probability)" if probabilities is not None else "") + " / true class"
    lines = [title] if title else []
    lines += [summary, legend]
    tiles: list[list[Tensor | None]] = []
    captions, frames = {}, {}
    for k, i in enumerate(shown):
        r, c = divmod(k, columns)
        if c == 0:
            tiles.append([])
        tiles[r].append(thumbnail(files[i], side))
        share = "" if probabilities is None else f" {100 * float(probabilities[i]):.0f}%"
        caption = [Path(files[i]).name] if show_files else []
        caption.append(_line("", predicted[i], share, side))
        if true[i] is not None:
            caption.append(_line("true ", str(true[i]), "", side))
        captions[r, c] = "\n".join(caption)
        if i in wrong_set:
            frames[r, c] = WRONG
    picture = labelled_grid(tiles, title="\n".join(lines), captions=captions, frames=frames)
    return Sheet(picture.save(path), picture, shown, wrong, summary)


def classify_sheet(
    path: str | Path, rows: Sequence[tuple[str, str, float]], class_names: Sequence[str]
) -> Sheet:
    """The sheet of ``metakd classify --sheet``: its ``(path, class, probability)`` rows.

    True classes come from the files' parent folders (:func:`folder_classes`); each caption
    starts with the file's name.
    """
    files = [row[0] for row in rows]
    return prediction_sheet(
        path,
        files,
        [row[1] for row in rows],
        [row[2] for row in rows],
        folder_classes(files, class_names),
        title="metakd classify",
        show_files=True,
    )


__all__ = [
    "SHEET_FILE",
    "Sheet",
    "classify_sheet",
    "folder_classes",
    "prediction_sheet",
    "summary_line",
    "thumbnail",
]
