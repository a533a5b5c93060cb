"""Pictures of the callbacks: the writer of a run, images as tiles, labelled grids, an episode.

:func:`labelled_grid` is the one renderer of the package's pictures: the TensorBoard episode
(:func:`episode_grid`), the attention maps (:mod:`~lightning_metakd.callbacks.attention_maps`) and
the prediction sheet of ``metakd finetune``/``classify`` (:mod:`lightning_metakd.deploy.sheet`).
It draws with PIL at the picture's native size: every tile scaled up by a whole factor (nearest
neighbour, so pixels stay sharp) and text of at least 10 px, so the picture reads at 100% zoom
in TensorBoard without a viewer's interpolation blurring 28 px kanji.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

#: ``(left, top, right, bottom)`` in pixels, right and bottom exclusive.
Box = tuple[int, int, int, int]
#: Text size in pixels (DejaVu Sans: capitals are about 10 px high).
FONT_SIZE = 14
#: The colours of the pictures: background, text, the mark of a wrong prediction.
BACKGROUND, INK, WRONG = (255, 255, 255), (34, 34, 34), (214, 39, 40)


class Picture(NamedTuple):
    """A rendered grid and where everything went (what tests and callers check)."""

    image: Tensor  #: ``[3, H, W]`` float in ``[0, 1]`` (what ``SummaryWriter.add_image`` takes)
    tiles: dict[tuple[int, int], Box]  #: ``(row, column)`` → the box of each drawn tile
    labels: list[tuple[str, Box]]  #: every text drawn, with its box

    def save(self, path: str | Path) -> Path:
        """Write the picture as a PNG (folders created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = (self.image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels, "RGB").save(path, optimize=True)
        return path


def tensorboard_experiment(trainer: L.Trainer) -> Any | None:
    """The ``SummaryWriter`` of the trainer's first TensorBoard logger on global rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def to_rgb(images: Tensor) -> Tensor:
    """``[B, C, H, W]`` → ``[B, 3, H, W]`` in ``[0, 1]``, each image min-max scaled on its own."""
    images = images.detach().float().cpu()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != 3:
        images = images[:, :1].expand(-1, 3, -1, -1)
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    return (images - low) / (high - low).clamp_min(1e-8)


def tile_scale(side: int, target: int = 84) -> int:
    """The whole upscaling factor that brings a ``side``-pixel tile near ``target`` pixels (≥ 1).

    Example:
        >>> tile_scale(28), tile_scale(8), tile_scale(84), tile_scale(200)
        (3, 10, 1, 1)
    """
    return max(1, round(target / side))


@functools.lru_cache(maxsize=4)
def font(size: int = FONT_SIZE) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib) at ``size`` px, else PIL's own default font."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), size)
    except (ImportError, OSError):
        return ImageFont.load_default(size)


def _text_size(draw: ImageDraw.ImageDraw, text: str, size: int) -> tuple[int, int]:
    if not text:
        return 0, 0
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font(size), spacing=2)
    return right, bottom


def text_width(text: str, size: int = FONT_SIZE) -> int:
    """The width in pixels of ``text`` (its widest line) drawn at ``size``."""
    return _text_size(ImageDraw.Draw(Image.new("RGB", (1, 1))), text, size)[0]


@functools.lru_cache(maxsize=1)
def _font_codepoints() -> frozenset[int] | None:
    """The characters :func:`font` can draw (DejaVu Sans' character map); None if unknown."""
    try:
        import matplotlib
        from matplotlib import ft2font

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return frozenset(ft2font.FT2Font(str(path)).get_charmap())
    except (ImportError, OSError, RuntimeError):
        return None


def drawable(text: str) -> str:
    """``text`` with every character the pictures' font cannot draw written as its code point.

    DejaVu Sans has no CJK glyphs, so ``"U+71ED-燭"`` would end in an empty box; a code point the
    text already names is dropped instead, with the separator before it.

    Example:
        >>> drawable("U+71ED-燭"), drawable("燭台"), drawable("café")
        ('U+71ED', 'U+71ED U+53F0', 'café')
    """
    known = _font_codepoints()
    if known is None or all(ord(c) in known for c in text):
        return text
    out = ""
    for char in text:
        if ord(char) in known:
            out += char
            continue
        code = f"U+{ord(char):04X}"
        if code in text:  # already named: drop the glyph and the separator before it
            out = out.rstrip(" -_:/")
        else:
            out += (" " if out and not out.endswith(" ") else "") + code
    return out


def fit_text(text: str, width: int, size: int = FONT_SIZE) -> str:
    """``text`` (:func:`drawable`) cut to ``width`` pixels with a trailing "…" if it is wider
    (one line).

    Example:
        >>> fit_text("kanji_03", 200), fit_text("a very long class name", 60)
        ('kanji_03', 'a very…')
    """
    text = drawable(text)
    if text_width(text, size) <= width:
        return text
    while text and text_width(text + "…", size) > width:
        text = text[:-1]
    return text.rstrip() + "…"


def labelled_grid(
    tiles: Sequence[Sequence[Tensor | None]],
    *,
    scale: int = 1,
    title: str = "",
    column_titles: Sequence[tuple[int, int, str]] = (),
    row_labels: Sequence[str] = (),
    captions: Mapping[tuple[int, int], str] | None = None,
    frames: Mapping[tuple[int, int], tuple[int, int, int]] | None = None,
    gaps: Sequence[int] = (),
    padding: int = 4,
    font_size: int = FONT_SIZE,
) -> Picture:
    """Rows of image tiles with a title, column titles, row labels and captions, as one picture.

    Args:
        tiles: ``tiles[r][c]`` is ``[3, h, w]`` in ``[0, 1]`` (every tile the same size), or
            ``None`` for an empty cell.
        scale: whole upscaling factor of every tile (nearest neighbour; see :func:`tile_scale`).
        title: text above everything (``\\n`` for more lines).
        column_titles: ``(first column, columns spanned, text)``, centred over the span.
        row_labels: text left of each row, e.g. ``"class 0"``.
        captions: ``(row, column)`` → text under that tile, cut to the tile's width per line;
            drawn in red where the tile has a frame.
        frames: ``(row, column)`` → the colour of a 3 px frame around that tile (in its padding).
        gaps: columns preceded by an extra gap of ``4 * padding`` (e.g. between support and
            queries).
        padding: pixels around every tile.
        font_size: text height in pixels.

    Returns:
        A :class:`Picture`: the image and the boxes of the tiles and of every text.
    """
    rows, columns = len(tiles), max((len(r) for r in tiles), default=0)
    shapes = {tuple(t.shape) for r in tiles for t in r if t is not None}
    if rows == 0 or columns == 0 or len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(
            f"labelled_grid needs at least one tile and every tile [3, h, w] of one size; got "
            f"{rows} rows and shapes {sorted(shapes)}."
        )
    _, h, w = next(iter(shapes))
    tile_w, tile_h = w * scale, h * scale
    captions, frames = captions or {}, frames or {}
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = _text_size(probe, "Tg", font_size)[1] + 2
    caption_lines = max((len(c.split("\n")) for c in captions.values()), default=0)
    caption_h = caption_lines * line + (2 if caption_lines else 0)
    cell_w, cell_h = tile_w + 2 * padding, tile_h + 2 * padding + caption_h
    label_w = max((_text_size(probe, s, font_size)[0] for s in row_labels), default=0)
    left = padding + (label_w + 2 * padding if row_labels else 0)
    title_h = _text_size(probe, title, font_size)[1] + 2 * padding if title else 0
    header_lines = max((len(t.split("\n")) for *_, t in column_titles), default=0)
    header_h = header_lines * line + padding if header_lines else 0
    top = padding + title_h + header_h
    x_of = []
    x = left
    for c in range(columns):
        x += 4 * padding if c in gaps else 0
        x_of.append(x)
        x += cell_w
    width = max(x + padding, _text_size(probe, title, font_size)[0] + 2 * padding)
    height = top + rows * cell_h + padding
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    text_font = font(font_size)
    labels: list[tuple[str, Box]] = []

    def write(xy: tuple[int, int], text: str, anchor: str, fill: tuple[int, int, int] = INK):
        draw.multiline_text(xy, text, fill=fill, font=text_font, anchor=anchor, spacing=2,
                            align="center" if anchor[0] == "m" else "left")  # fmt: skip
        box = draw.multiline_textbbox(xy, text, font=text_font, anchor=anchor, spacing=2)
        labels.append((text, tuple(int(v) for v in box)))  # type: ignore[arg-type]

    if title:
        write((padding, padding), title, "la")
    for first, span, text in column_titles:
        centre = (x_of[first] + x_of[first + span - 1] + cell_w) // 2
        write((centre, top - padding), text, "md")
    boxes: dict[tuple[int, int], Box] = {}
    for r, row in enumerate(tiles):
        y = top + r * cell_h + padding
        if r < len(row_labels) and row_labels[r]:
            write((left - 2 * padding, y + tile_h // 2), row_labels[r], "rm")
        for c, tile in enumerate(row):
            if tile is None:
                continue
            x = x_of[c] + padding
            pixels = tile.detach().float().cpu().clamp(0, 1)
            pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
            array = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(np.ascontiguousarray(array), "RGB"), (x, y))
            boxes[(r, c)] = (x, y, x + tile_w, y + tile_h)
            colour = frames.get((r, c))
            if colour is not None:
                draw.rectangle((x - 3, y - 3, x + tile_w + 2, y + tile_h + 2), outline=colour,
                               width=3)  # fmt: skip
            if (r, c) in captions:
                lines = captions[r, c].split("\n")
                text = "\n".join(fit_text(s, tile_w + padding, font_size) for s in lines)
                write((x + tile_w // 2, y + tile_h + padding), text, "ma", colour or INK)
    image = torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255
    return Picture(image, boxes, labels)


def episode_grid(
    support_x: Tensor,
    support_y: Tensor,
    query_x: Tensor,
    query_y: Tensor,
    max_queries: int = 5,
    scale: int | None = None,
) -> Picture:
    """One task as a labelled picture: a row per class, its support images, then its queries.

    Column titles ``support`` and ``queries`` over the two blocks (a gap between them), a row
    label ``class c`` per episode label, and a title with the setting (``5-way 1-shot, 15 queries
    per class (5 shown)``).

    Args:
        support_x, support_y: ``[N*K, C, H, W]`` and ``[N*K]`` of one task.
        query_x, query_y: ``[N*Q, C, H, W]`` and ``[N*Q]``; at most ``max_queries`` per class shown.
        scale: tile upscaling (default :func:`tile_scale`: 28 px images at 3x).

    Example:
        >>> picture = episode_grid(torch.rand(5, 1, 28, 28), torch.arange(5),
        ...                        torch.rand(10, 1, 28, 28), torch.arange(5).repeat_interleave(2))
        >>> picture.image.shape, len(picture.tiles)  # 5 rows of 1 support + 2 queries
        (torch.Size([3, 514, 356]), 15)
        >>> picture.tiles[0, 0]  # (left, top, right, bottom): 28 px at 3x
        (64, 54, 148, 138)
        >>> [text for text, _ in picture.labels][:4]
        ['5-way 1-shot, 2 queries per class', 'support', 'queries', 'class 0']
    """
    ways = int(support_y.max()) + 1
    support, query = to_rgb(support_x), to_rgb(query_x)
    shots = max(int((support_y == c).sum()) for c in range(ways))
    per_class = max(int((query_y == c).sum()) for c in range(ways))
    queries = min(max_queries, per_class)
    tiles = []
    for c in range(ways):
        row_s: list[Tensor | None] = list(support[support_y == c])
        row_q: list[Tensor | None] = list(query[query_y == c][:queries])
        tiles.append(row_s + [None] * (shots - len(row_s)) + row_q)
    shown = f" ({queries} shown)" if queries < per_class else ""
    return labelled_grid(
        tiles,
        scale=tile_scale(support.shape[-1]) if scale is None else scale,
        title=f"{ways}-way {shots}-shot, {per_class} queries per class{shown}",
        column_titles=[(0, shots, "support"), (shots, queries, "queries")],
        row_labels=[f"class {c}" for c in range(ways)],
        gaps=[shots],
    )


__all__ = [
    "Picture",
    "episode_grid",
    "drawable",
    "fit_text",
    "labelled_grid",
    "tensorboard_experiment",
    "text_width",
    "tile_scale",
    "to_rgb",
]
