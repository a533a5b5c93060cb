"""KanjiVG stroke data parsed from its SVGs and rendered as Omniglot-like hand-drawn characters.

KanjiVG (Ulrich Apel and the KanjiVG project, https://kanjivg.tagaini.net, CC BY-SA 3.0) describes
every character as an ordered list of strokes, each a cubic Bézier path in a 109 x 109 box, and
marks the character's radical. This module reads those files from the installed ``kanjivg`` wheel
(no network) and draws each stroke as a jittered pen line: a stand-in for Omniglot's many drawers
(Lake et al., "Human-level concept learning through probabilistic program induction", Science 2015).
"""

from __future__ import annotations

import importlib.metadata
import math
import multiprocessing
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

#: The XML namespace of KanjiVG's ``kvg:`` attributes.
KANJIVG_NAMESPACE = "http://kanjivg.tagaini.net"
#: ``kvg:radical`` values that name a character's radical (``nelson``/``tradit``: the dictionary's).
RADICAL_KINDS = ("general", "tradit", "nelson")
#: Side of KanjiVG's square drawing box (``viewBox="0 0 109 109"``).
KANJIVG_BOX = 109.0

_SVG_PATH = "{http://www.w3.org/2000/svg}path"
_SVG_GROUP = "{http://www.w3.org/2000/svg}g"
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_COMMAND = re.compile(r"([A-Za-z])([^A-Za-z]*)")
_ARITY = {"M": 2, "C": 6, "S": 4}


@dataclass(frozen=True)
class KanjiStrokes:
    """One KanjiVG character: its strokes as chains of cubic Bézier points, and its radical.

    ``chains[i]`` is a float32 array ``[1 + 3 * k, 2]`` of ``(x, y)`` points in the 109 x 109 box:
    a start point, then ``(control 1, control 2, end)`` for each of the ``k`` cubic segments.
    ``chain_stroke[i]`` is the stroke (SVG ``<path>``) chain ``i`` belongs to; KanjiVG has one chain
    per stroke, but a path with several sub-paths would give several.
    """

    codepoint: int
    chains: tuple[np.ndarray, ...]
    chain_stroke: tuple[int, ...]
    radical: str | None
    #: ``(element, strokes)`` of each whole ``<g kvg:element>`` part below the character (its
    #: radical and other building blocks, nested ones included; parts split in pieces, which
    #: KanjiVG marks ``kvg:part``, are left out), ``strokes`` indices into the character's strokes.
    components: tuple[tuple[str, tuple[int, ...]], ...] = ()
    #: What the class is: ``"kanji"``, or the :mod:`~lightning_metakd.data.kanji_simple` kinds.
    kind: str = "kanji"
    #: For a component cut out of a kanji: that kanji's radical group (where it came from).
    source: str | None = None

    @property
    def character(self) -> str:
        return chr(self.codepoint)

    @property
    def num_strokes(self) -> int:
        return len(set(self.chain_stroke))

    @property
    def class_name(self) -> str:
        """A globally unique class name, e.g. ``"kanji:U+8A9E"`` for 語 (``"kana:U+3042"``…)."""
        return f"{self.kind}:U+{self.codepoint:04X}"


def kanjivg_version() -> str:
    """Version of the installed ``kanjivg`` wheel (part of every cache key)."""
    try:
        return importlib.metadata.version("kanjivg")
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(_MISSING) from err


_MISSING = (
    "The KanjiVG stroke data is not installed. Install it with `pip install kanjivg` (it is a "
    "dependency of lightning-metakd, CC BY-SA 3.0)."
)


def kanjivg_files() -> dict[int, Path]:
    """Code point -> SVG file of each base character (variants, whose stem has a ``-``, skipped)."""
    try:
        files = importlib.metadata.files("kanjivg")
    except importlib.metadata.PackageNotFoundError as err:
        raise ModuleNotFoundError(_MISSING) from err
    found: dict[int, Path] = {}
    for file in files or ():
        path = Path(str(file))
        if path.suffix != ".svg" or path.parent.name != "kanji" or "-" in path.stem:
            continue
        found[int(path.stem, 16)] = Path(file.locate())
    if not found:
        raise FileNotFoundError(f"The kanjivg package lists no SVG files under kanji/. {_MISSING}")
    return found


def parse_path(d: str) -> list[np.ndarray]:
    """Parse an SVG path of ``M/m``, ``C/c`` and ``S/s`` commands into Bézier point chains.

    Returns one float32 array ``[1 + 3 * k, 2]`` per sub-path (see :class:`KanjiStrokes`); ``S``
    is expanded to ``C`` by reflecting the previous second control point. Other commands raise
    ``ValueError`` (KanjiVG uses only these three).

    Example:
        >>> [chain.shape for chain in parse_path("M26,15.25c2.82,1.41,7.29,5.8,8,8s1,2,3,4")]
        [(7, 2)]
    """
    chains: list[list[tuple[float, float]]] = []
    current = np.zeros(2)
    last_control: np.ndarray | None = None
    for command, args in _COMMAND.findall(d):
        upper = command.upper()
        if upper not in _ARITY:
            raise ValueError(
                f"Unsupported SVG path command {command!r} in {d[:60]!r}: only M/m, C/c and S/s "
                "(the commands KanjiVG uses) are understood."
            )
        numbers = [float(x) for x in _NUMBER.findall(args)]
        arity = _ARITY[upper]
        if not numbers or len(numbers) % arity:
            raise ValueError(
                f"SVG path command {command!r} needs a multiple of {arity} numbers, got "
                f"{len(numbers)} in {d[:60]!r}."
            )
        relative = command.islower()
        for start in range(0, len(numbers), arity):
            pts = np.asarray(numbers[start : start + arity]).reshape(-1, 2)
            if relative:
                pts = pts + current
            if upper == "M" and start == 0:
                chains.append([tuple(pts[0])])
                last_control = None
            elif upper == "M":  # extra pairs after a moveto are implicit line-tos: a straight cubic
                pts = np.stack([current, pts[0], pts[0]])
                chains[-1].extend(tuple(p) for p in pts)
                last_control = None
            else:
                if not chains:
                    raise ValueError(f"SVG path {d[:60]!r} draws before its first moveto.")
                if upper == "S":
                    reflected = 2 * current - last_control if last_control is not None else current
                    pts = np.concatenate([reflected[None], pts])
                chains[-1].extend(tuple(p) for p in pts)
                last_control = pts[1]
            current = pts[-1]
    return [np.asarray(chain, dtype=np.float32) for chain in chains]


def find_radical(root: ET.Element) -> str | None:
    """The radical group of a KanjiVG character: ``kvg:element`` of its first radical ``<g>``.

    The first ``<g>`` (document order) whose ``kvg:radical`` is one of :data:`RADICAL_KINDS` and
    that has a ``kvg:element``; ``None`` when there is none (kana, ASCII, a few kanji).
    """
    radical_key, element_key = f"{{{KANJIVG_NAMESPACE}}}radical", f"{{{KANJIVG_NAMESPACE}}}element"
    for group in root.iter(_SVG_GROUP):
        element = group.get(element_key)
        if element and group.get(radical_key) in RADICAL_KINDS:
            return element
    return None


def parse_kanji_svg(path: str | Path, codepoint: int | None = None) -> KanjiStrokes:
    """Read one KanjiVG SVG file: its strokes (document order = stroke order) and radical."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"Cannot parse KanjiVG file {path}: {err}. Reinstall kanjivg.") from err
    chains: list[np.ndarray] = []
    chain_stroke: list[int] = []
    stroke_of: dict[int, int] = {}
    for stroke, element in enumerate(root.iter(_SVG_PATH)):
        try:
            parsed = parse_path(element.get("d", ""))
        except ValueError as err:
            raise ValueError(f"{path.name}: {err}") from err
        chains.extend(parsed)
        chain_stroke.extend([stroke] * len(parsed))
        stroke_of[id(element)] = stroke
    if codepoint is None:
        codepoint = int(path.stem.split("-")[0], 16)
    return KanjiStrokes(
        codepoint,
        tuple(chains),
        tuple(chain_stroke),
        find_radical(root),
        _components(root, stroke_of),
    )


def _components(
    root: ET.Element, stroke_of: dict[int, int]
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The whole ``<g kvg:element>`` parts below the character's own group (see KanjiStrokes)."""
    element_key, part_key = f"{{{KANJIVG_NAMESPACE}}}element", f"{{{KANJIVG_NAMESPACE}}}part"
    found = []
    for group in root.iter(_SVG_GROUP):
        # parts are "kvg:<code>-g<n>"; the character's own group is "kvg:<code>"
        if group.get(element_key) and "-g" in group.get("id", "") and group.get(part_key) is None:
            strokes = tuple(stroke_of[id(p)] for p in group.iter(_SVG_PATH))
            if strokes:
                found.append((group.get(element_key), strokes))
    return tuple(found)


@lru_cache(maxsize=1)
def load_kanjivg() -> tuple[KanjiStrokes, ...]:
    """Every base character of the installed KanjiVG, parsed (about 2 s; memoised per process)."""
    return tuple(parse_kanji_svg(path, cp) for cp, path in sorted(kanjivg_files().items()))


@dataclass(frozen=True)
class RenderConfig:
    """How a character is drawn: pen width and the random deformations of each drawing.

    Lengths are in KanjiVG units (the character box is 109 wide); the rendered image maps that box
    to ``image_size`` pixels. Each image draws, from its own random stream:

    - an affine map of the whole character: rotation (degrees), isotropic scale, shear and
      translation, each uniform in ``[-x, x]`` (scale in ``[1 - x, 1 + x]``);
    - for each stroke, an offset (Gaussian, ``stroke_offset`` std) and independent Gaussian noise
      of ``point_jitter`` std on every Bézier point (the wobble of a hand);
    - one pen width, uniform in ``stroke_width``.

    Strokes are drawn at ``supersample`` times the resolution and box-filtered down (antialiasing).
    The defaults make raw-pixel nearest-centroid accuracy about as low as on Omniglot.
    """

    image_size: int = 28
    supersample: int = 4
    stroke_width: tuple[float, float] = (3.0, 6.0)
    point_jitter: float = 1.5
    stroke_offset: float = 1.5
    rotation: float = 10.0
    scale: float = 0.12
    shear: float = 0.15
    translation: float = 7.5
    curve_samples: int = 8

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.supersample < 1 or self.curve_samples < 2:
            raise ValueError(
                "RenderConfig needs image_size >= 1, supersample >= 1 and curve_samples >= 2, got "
                f"{self.image_size}, {self.supersample} and {self.curve_samples}."
            )
        low, high = self.stroke_width
        if not 0 < low <= high:
            raise ValueError(
                f"stroke_width must be (low, high) with 0 < low <= high, got {self.stroke_width}."
            )

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def draw(self, kanji: KanjiStrokes, rng: np.random.Generator) -> np.ndarray:
        """One drawing of ``kanji`` in this style (:func:`render_kanji`)."""
        return render_kanji(kanji, self, rng)


class RenderStyle(Protocol):
    """A way of drawing characters: this module's :class:`RenderConfig` (the classic style) or
    :class:`~lightning_metakd.data.kanji_handwriting.HandwritingConfig`."""

    image_size: int

    def as_dict(self) -> dict: ...

    def draw(self, kanji: KanjiStrokes, rng: np.random.Generator) -> np.ndarray: ...


@lru_cache(maxsize=8)
def bernstein(samples: int) -> np.ndarray:
    """The cubic Bernstein basis at ``samples`` evenly spaced ``t``: ``[samples, 4]`` (read-only)."""
    t = np.linspace(0.0, 1.0, samples)[:, None]
    basis = np.concatenate([(1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3], axis=1)
    basis.flags.writeable = False
    return basis


@lru_cache(maxsize=16384)  # one entry per distinct stroke layout: a few thousand
def _bezier_layout(lengths: tuple[int, ...]) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """Where each chain's cubic segments are in the concatenated points, and its point range.

    Returns the ``[segments, 4]`` indices of every segment's four control points (all chains of
    at least 4 points, in order) and, per chain, ``(first, stop)``: its segments' rows in that
    array, or for a chain too short for a cubic, ``(-1 - start, length)`` of its raw points.
    """
    rows, ranges, start = [], [], 0
    for length in lengths:
        if length >= 4:
            first = len(rows)
            rows.extend(range(start + 3 * j, start + 3 * j + 4) for j in range((length - 1) // 3))
            ranges.append((first, len(rows)))
        else:
            ranges.append((-1 - start, length))
        start += length
    index = np.asarray(rows, dtype=np.intp).reshape(-1, 4)
    return index, tuple(ranges)


def chain_polylines(
    points: np.ndarray, lengths: tuple[int, ...], samples: int
) -> list[list[tuple[float, float]]]:
    """Each chain of Bézier points ``[sum(lengths), 2]`` as the polyline a pen draws along it.

    A chain of ``1 + 3k`` points becomes ``k * samples`` points, each cubic segment sampled at
    ``samples`` evenly spaced ``t`` (:func:`bernstein`); a shorter chain is drawn as its points.
    All chains' segments are evaluated in one product.
    """
    index, ranges = _bezier_layout(lengths)
    curves = (bernstein(samples) @ points[index]).tolist() if len(index) else []
    lines = []
    for first, stop in ranges:
        if first >= 0:
            lines.append([tuple(p) for segment in curves[first:stop] for p in segment])
        else:
            start = -1 - first
            lines.append([tuple(p) for p in points[start : start + stop].tolist()])
    return lines


def round_joint_line(draw: ImageDraw.ImageDraw, xy: list[tuple[float, float]], width: int) -> None:
    """``draw.line(xy, fill=255, width=width, joint="curve")``, pixel for pixel, in fewer steps.

    Pillow rounds each bend of a polyline wider than 4 px with a pie slice of the pen's circle,
    through three Python wrappers per bend; a render draws about a hundred bends per image, so
    those wrappers were a third of the render's time. This draws the same slices (the same
    angles, computed the same way, each segment's once) straight through the drawing object.
    Lines wider than 8 px, where Pillow also patches gaps at the bends, go through Pillow itself.
    """
    if width > 8 or len(xy) < 3:
        draw.line(xy, fill=255, width=width, joint="curve")
        return
    core = draw.draw
    ink = core.draw_ink(255)
    core.draw_lines(xy, ink, width)
    if width <= 4:
        return
    half = width / 2
    degrees, atan2 = math.degrees, math.atan2
    (x0, y0), (x, y) = xy[0], xy[1]
    before = degrees(atan2(x - x0, y0 - y)) % 360
    for x1, y1 in xy[2:]:
        after = degrees(atan2(x1 - x, y - y1)) % 360
        if after != before:  # a bend (Pillow skips straight continuations)
            if (after > before and after - 180 > before) or (
                after < before and after + 180 > before
            ):
                start, end = after + 90, before + 90
            else:
                start, end = before - 90, after - 90
            core.draw_pieslice(
                ((x - half + 1, y - half + 1), (x + half - 1, y + half - 1)),
                start - 90,
                end - 90,
                ink,
                1,
            )
        before, x, y = after, x1, y1


def render_kanji(kanji: KanjiStrokes, config: RenderConfig, rng: np.random.Generator) -> np.ndarray:
    """One hand-drawn-looking image ``[H, W]`` uint8 of ``kanji``: white strokes (255) on black."""
    if not kanji.chains:
        raise ValueError(f"KanjiVG character {kanji.class_name} has no strokes to draw.")
    c = config
    points = np.concatenate(kanji.chains).astype(np.float64)
    lengths = [len(chain) for chain in kanji.chains]
    chain_of_point = np.repeat(np.arange(len(lengths)), lengths)
    stroke_of_point = np.asarray(kanji.chain_stroke)[chain_of_point]

    points = points + rng.normal(0.0, c.point_jitter, points.shape)
    offsets = rng.normal(0.0, c.stroke_offset, (max(kanji.chain_stroke) + 1, 2))
    points += offsets[stroke_of_point]

    angle = math.radians(rng.uniform(-c.rotation, c.rotation))
    scale = 1.0 + rng.uniform(-c.scale, c.scale)
    shear = rng.uniform(-c.shear, c.shear)
    cos, sin = math.cos(angle), math.sin(angle)
    matrix = scale * np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])
    shift = rng.uniform(-c.translation, c.translation, 2)
    centre = KANJIVG_BOX / 2
    canvas = c.image_size * c.supersample
    points = ((points - centre) @ matrix.T + centre + shift) * (canvas / KANJIVG_BOX)

    width = rng.uniform(*c.stroke_width) * canvas / KANJIVG_BOX
    radius = width / 2
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    for xy in chain_polylines(points, tuple(lengths), c.curve_samples):
        round_joint_line(draw, xy, max(1, round(width)))
        for x, y in (xy[0], xy[-1]):  # round pen caps
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    if c.supersample > 1:
        image = image.reduce(c.supersample)
    return np.asarray(image, dtype=np.uint8)


def sample_rng(seed: int, codepoint: int, index: int) -> np.random.Generator:
    """The random stream of drawing ``index`` of character ``codepoint``, whatever the batching."""
    return np.random.default_rng([seed, codepoint, index])


#: Renders of fewer images stay in one process (a spawned worker takes seconds to start).
PARALLEL_RENDER_IMAGES = 5000


def render_samples(
    kanji: Sequence[KanjiStrokes],
    samples_per_class: int,
    config: RenderStyle,
    seed: int = 0,
    progress: bool = True,
    processes: int = 1,
) -> np.ndarray:
    """Draw ``samples_per_class`` images of each character: uint8 ``[len(kanji) * S, 1, H, W]``.

    Image ``i * S + j`` is drawing ``j`` of ``kanji[i]``, drawn from :func:`sample_rng` so that it
    does not depend on which other characters are rendered, or in which order, or on how many
    ``processes`` share the work (chunks of characters in spawned worker processes, for renders of
    at least :data:`PARALLEL_RENDER_IMAGES` images: below that, starting them costs more).
    """
    size = config.image_size
    out = np.empty((len(kanji) * samples_per_class, 1, size, size), dtype=np.uint8)
    bar = tqdm(
        total=len(out), desc="Rendering KanjiVG", unit="img", file=sys.stderr, disable=not progress
    )
    with bar:
        if processes <= 1 or len(out) < PARALLEL_RENDER_IMAGES or len(kanji) < 2 * processes:
            for i, character in enumerate(kanji):
                out[i * samples_per_class : (i + 1) * samples_per_class] = _draw_class(
                    character, samples_per_class, config, seed
                )
                bar.update(samples_per_class)
            return out
        chunk = max(1, min(64, len(kanji) // (4 * processes)))
        context = multiprocessing.get_context("spawn")  # fork is unsafe beside torch's threads
        with ProcessPoolExecutor(processes, mp_context=context) as pool:
            jobs = {
                pool.submit(_draw_classes, kanji[i : i + chunk], samples_per_class, config, seed): i
                for i in range(0, len(kanji), chunk)
            }
            for job in as_completed(jobs):
                images = job.result()
                start = jobs[job] * samples_per_class
                out[start : start + len(images)] = images
                bar.update(len(images))
    return out


def _draw_class(
    character: KanjiStrokes, samples_per_class: int, config: RenderStyle, seed: int
) -> np.ndarray:
    images = [
        config.draw(character, sample_rng(seed, character.codepoint, j))
        for j in range(samples_per_class)
    ]
    return np.stack(images)[:, None]


def _draw_classes(
    kanji: Sequence[KanjiStrokes], samples_per_class: int, config: RenderStyle, seed: int
) -> np.ndarray:
    return np.concatenate([_draw_class(k, samples_per_class, config, seed) for k in kanji])
