"""KanjiVG drawn like real handwriting: domain-randomised pens, hands and scanners.

A network meta-trained on clean, constant-width renders meets real pen strokes only at test time
and transfers badly. Domain randomisation (Tobin et al., "Domain Randomization for Transferring
Deep Neural Networks from Simulation to the Real World", IROS 2017) widens the simulator instead
of matching it: if the training drawings vary more than real ones do, real drawings look like one
more variation. Each drawing here samples, from its own random stream:

- **a pen**: a width (log-uniform: fine liner to marker; finer for characters of more than six
  strokes, whose strokes would otherwise merge), pressure that swells and thins along each
  stroke, tapered or blunt stroke endings, and a point spacing that makes strokes smooth (a pen)
  or polygonal (a mouse, as Omniglot was drawn; Lake et al. 2015);
- **a hand**: a writing speed; faster hands wobble more, overshoot or stop short at stroke ends,
  and join strokes with thin ligatures. The hand drifts as a random walk in stroke order and grows
  sloppier with each stroke, so later strokes stray more (stroke-order-aware noise);
- **the paper**: a global affine map (rotation, scale, aspect, shear, shift) and a smooth elastic
  distortion (Simard et al., "Best Practices for Convolutional Neural Networks Applied to Visual
  Document Analysis", ICDAR 2003), applied to the stroke points;
- **missing strokes**: each stroke is left out with a small probability (never all of them);
- **a scanner**: the strokes are drawn large and one-bit, blurred by a random amount and thresholded
  again at a random level (ink that bleeds or thins), then reduced to ``image_size`` like Omniglot's
  105 x 105 one-bit images; some drawings are first reduced to a coarse grid by area (as the UCI
  digits count ink in 4 x 4 blocks) and scaled back up.

Lengths are in KanjiVG units (the character box is 109 wide). The classic renderer of
:mod:`~lightning_metakd.data.kanji_render` is unchanged; this style is chosen with
``KanjiDataModule(render_style="handwriting")`` and has its own cache files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lightning_metakd.data.kanji_render import KANJIVG_BOX, KanjiStrokes, RenderConfig, bernstein

#: Bump when :func:`render_handwriting` draws differently for the same config: part of the cache key.
HANDWRITING_VERSION = 1
_CURVE_SAMPLES = 12  # points per Bézier segment before resampling by arc length


@dataclass(frozen=True)
class HandwritingConfig:
    """The ranges a handwriting-style drawing samples from (see the module docs for each step).

    Pairs ``(low, high)`` are sampled uniformly per drawing (``pen_width`` and ``spacing``
    log-uniformly); single numbers are the largest amplitude or a probability. Lengths are
    KanjiVG units (box 109).

    - ``pen_width``: stroke width; ``pressure``: relative swell along a stroke; ``taper``: how
      much a stroke thins over its first 20% and last 25%; ``spacing``: distance between the
      points of a drawn stroke (large: a mouse's polygonal lines).
    - ``point_jitter``: Gaussian noise on the Bézier points; ``wobble``: sideways sway of a
      stroke; ``drift``: step of the hand's random walk from stroke to stroke; ``end_jitter``:
      over- or undershoot of stroke ends; the last three grow with speed and stroke order.
    - ``ligature``: chance (times speed) that a stroke is joined to the previous one;
      ``stroke_dropout``: chance that one stroke of a 3+ stroke character is left out.
    - ``rotation`` (degrees), ``scale``, ``aspect`` (log x/y stretch), ``shear``, ``translation``
      and ``elastic`` (displacement amplitude): the paper.
    - ``blur``: Gaussian sigma in pen radii before binarising at ``threshold`` (a fraction of
      full ink); ``low_resolution``: chance of a coarse scan of ``scan_size`` pixels a side.
    - ``supersample``: the one-bit canvas is ``image_size * supersample`` pixels a side.
    """

    image_size: int = 28
    supersample: int = 4
    pen_width: tuple[float, float] = (2.5, 12.0)
    pressure: float = 0.4
    taper: float = 0.8
    spacing: tuple[float, float] = (2.5, 8.0)
    point_jitter: float = 1.5
    wobble: float = 1.2
    drift: float = 1.5
    end_jitter: float = 3.0
    ligature: float = 0.15
    stroke_dropout: float = 0.2
    rotation: float = 12.0
    scale: tuple[float, float] = (0.72, 1.05)
    aspect: float = 0.25
    shear: float = 0.25
    translation: float = 8.0
    elastic: float = 5.0
    blur: tuple[float, float] = (0.0, 1.0)
    threshold: tuple[float, float] = (0.35, 0.6)
    low_resolution: float = 0.2
    scan_size: tuple[int, int] = (8, 20)

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.supersample < 1:
            raise ValueError(
                f"HandwritingConfig needs image_size >= 1 and supersample >= 1, got "
                f"{self.image_size} and {self.supersample}."
            )
        for name in ("pen_width", "spacing", "scale", "blur", "threshold", "scan_size"):
            low, high = getattr(self, name)
            if not 0 <= low <= high or (name != "blur" and low == 0):
                raise ValueError(
                    f"{name} must be (low, high) with 0 < low <= high, got {(low, high)}."
                )
        for name in ("stroke_dropout", "ligature", "low_resolution"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} is a probability in [0, 1), got {getattr(self, name)}.")

    def as_dict(self) -> dict:
        """Every parameter, the style and its version: what the cache key hashes."""
        values = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"style": "handwriting", "style_version": HANDWRITING_VERSION, **values}

    def draw(self, kanji: KanjiStrokes, rng: np.random.Generator) -> np.ndarray:
        return render_handwriting(kanji, self, rng)


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1])))


def _ranges(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For runs of ``counts`` items: the run of each item and its index inside the run."""
    run = np.repeat(np.arange(len(counts)), counts)
    return run, np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def _curves(
    kanji: KanjiStrokes, keep: np.ndarray, jitter: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The kept chains as dense polylines: points ``[N, 2]`` and the chain of each point ``[N]``.

    Every Bézier point gets Gaussian ``jitter`` first (the shape of each curve varies).
    """
    lengths = np.array([len(chain) for chain in kanji.chains])
    starts = np.cumsum(lengths) - lengths
    points = np.concatenate(kanji.chains).astype(np.float64)
    points += rng.normal(0.0, jitter, points.shape)
    chains = np.flatnonzero(keep[np.asarray(kanji.chain_stroke)])
    segments = np.maximum((lengths[chains] - 1) // 3, 1)  # a lone moveto: one degenerate segment
    run, local = _ranges(segments)
    index = (starts[chains][run] + 3 * local)[:, None] + np.arange(4)
    index = np.minimum(index, (starts + lengths - 1)[chains][run][:, None])
    dense = np.einsum("mj,sjd->smd", bernstein(_CURVE_SAMPLES), points[index]).reshape(-1, 2)
    return dense, np.repeat(run, _CURVE_SAMPLES)


def _resample(
    points: np.ndarray, chain: np.ndarray, spacing: float, ends: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each chain resampled every ``spacing`` units of arc length, its ends moved by ``ends``.

    ``ends[i] = (start, end)``: chain ``i`` runs from arc length ``-start`` to ``length + end``;
    negative values stop short (by at most 30% of the length), positive ones run on along the end
    tangents (over- and undershoot). Returns the points ``[n, 2]``, their chain ``[n]``, their arc
    length ``[n]`` and their relative position ``[n]`` in ``[0, 1]``.
    """
    same = chain[1:] == chain[:-1]
    step = np.where(same, np.linalg.norm(np.diff(points, axis=0), axis=1), 0.0)
    arc = np.concatenate([[0.0], np.cumsum(step)])
    first = np.flatnonzero(np.concatenate([[True], ~same]))
    last = np.concatenate([first[1:] - 1, [len(points) - 1]])
    length = arc[last] - arc[first]
    ends = np.maximum(ends, -0.3 * length[:, None])
    span = length + ends.sum(1)
    counts = np.maximum(2, np.ceil(span / spacing).astype(np.int64) + 1)
    run, local = _ranges(counts)
    u = local / (counts[run] - 1)
    s = u * span[run] - ends[run, 0]
    inside = np.clip(s, 0.0, length[run])
    key = arc + 1e4 * chain  # one increasing axis for all chains
    at = inside + arc[first][run] + 1e4 * run
    out = np.stack([np.interp(at, key, points[:, 0]), np.interp(at, key, points[:, 1])], axis=1)
    head = points[np.minimum(first + 2, last)] - points[first]
    tail = points[last] - points[np.maximum(last - 2, first)]
    head /= np.maximum(np.linalg.norm(head, axis=1, keepdims=True), 1e-9)
    tail /= np.maximum(np.linalg.norm(tail, axis=1, keepdims=True), 1e-9)
    out += (
        np.minimum(s, 0.0)[:, None] * head[run]
        + np.maximum(s - length[run], 0)[:, None] * tail[run]
    )
    return out, run, s, u


def _normals(points: np.ndarray, chain: np.ndarray) -> np.ndarray:
    """Unit normals ``[n, 2]`` of polylines (central differences inside each chain)."""
    starts = np.concatenate([[True], chain[1:] != chain[:-1]])
    stops = np.concatenate([chain[1:] != chain[:-1], [True]])
    previous = np.where(starts[:, None], points, np.roll(points, 1, axis=0))
    following = np.where(stops[:, None], points, np.roll(points, -1, axis=0))
    tangent = following - previous
    tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
    return np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)


def _draw_pen(
    draw: ImageDraw.ImageDraw,
    xy: np.ndarray,
    radius: np.ndarray,
    chain: np.ndarray,
    joins: np.ndarray,
) -> None:
    """Each chain as the filled outline of a pen of varying ``radius``, with round ends and corners.

    A disc is stamped at both ends and wherever the line turns by more than 30 degrees, where the
    outline polygon folds over itself; ``joins[i]`` adds a thin ligature from chain ``i - 1``.
    """
    normals = _normals(xy, chain)
    left, right = xy + radius[:, None] * normals, xy - radius[:, None] * normals
    starts = np.flatnonzero(np.concatenate([[True], chain[1:] != chain[:-1]]))
    stops = np.concatenate([starts[1:], [len(xy)]])
    step = np.diff(xy, axis=0)
    step /= np.maximum(np.linalg.norm(step, axis=1, keepdims=True), 1e-9)
    disc = np.concatenate([[True], (step[:-1] * step[1:]).sum(1) < 0.87, [True]])
    disc[starts] = disc[stops - 1] = True
    for i, (a, b) in enumerate(zip(starts.tolist(), stops.tolist(), strict=True)):
        draw.polygon(np.concatenate([left[a:b], right[a:b][::-1]]).ravel().tolist(), fill=255)
        if i and joins[i]:
            ligature = xy[a - 1 : a + 1].ravel().tolist()
            draw.line(ligature, fill=255, width=max(1, round(radius[a])))
    for x, y, r in np.column_stack([xy, radius])[disc].tolist():
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)


def _elastic(points: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth random displacement of all ``points`` of a drawing (elastic distortion, Simard et
    al. 2003): three plane waves per axis, 40-120 units long, of about ``amplitude`` units."""
    directions = rng.uniform(0, 2 * math.pi, (2, 3))
    wavenumbers = 2 * math.pi / rng.uniform(40, 120, (2, 3))
    phases = rng.uniform(0, 2 * math.pi, (2, 3))
    k = np.stack([np.cos(directions), np.sin(directions)], -1) * wavenumbers[..., None]  # [2, 3, 2]
    waves = np.sin(np.einsum("nd,akd->nak", points, k) + phases)  # [n, axis, wave]
    return points + amplitude / math.sqrt(3) * waves.sum(-1)


def _affine(c: HandwritingConfig, rng: np.random.Generator) -> np.ndarray:
    angle = math.radians(rng.uniform(-c.rotation, c.rotation))
    cos, sin = math.cos(angle), math.sin(angle)
    aspect = math.exp(rng.uniform(-c.aspect, c.aspect))
    rotate = np.array([[cos, -sin], [sin, cos]])
    shear = np.array([[1.0, rng.uniform(-c.shear, c.shear)], [0.0, 1.0]])
    return rng.uniform(*c.scale) * rotate @ shear @ np.diag([aspect, 1 / aspect])


def render_handwriting(
    kanji: KanjiStrokes, config: HandwritingConfig, rng: np.random.Generator
) -> np.ndarray:
    """One handwriting-style image ``[H, W]`` uint8 of ``kanji``: white strokes (255) on black.

    The steps, in order, are those of the module docs; every random number comes from ``rng``.
    """
    if not kanji.chains:
        raise ValueError(f"KanjiVG character {kanji.class_name} has no strokes to draw.")
    c = config
    strokes = max(kanji.chain_stroke) + 1
    keep = np.ones(strokes, dtype=bool)
    if strokes >= 3 and rng.random() < c.stroke_dropout:
        keep[rng.integers(strokes)] = False
    speed = rng.uniform()
    # Dense characters are written with a finer pen for their size, or their strokes merge.
    width = _log_uniform(rng, c.pen_width) * min(1.0, math.sqrt(6 / strokes))
    spacing = _log_uniform(rng, c.spacing)
    pressure, taper_in, taper_out = rng.uniform(0, 1, 3) * (c.pressure, c.taper, c.taper)

    # The hand: a random walk in stroke order, sloppier with every stroke.
    drift = np.cumsum(rng.normal(0.0, c.drift, (strokes, 2)), axis=0)
    sloppiness = speed * (0.5 + np.arange(strokes) / max(1, strokes - 1))
    points, chain = _curves(kanji, keep, c.point_jitter, rng)
    stroke_of = np.asarray(kanji.chain_stroke)[keep[np.asarray(kanji.chain_stroke)]]
    points += (drift - drift[keep].mean(0))[stroke_of][chain]
    sloppy = sloppiness[stroke_of]
    ends = rng.normal(0.0, 1.0, (len(stroke_of), 2)) * (c.end_jitter * sloppy)[:, None]
    points, chain, arc, u = _resample(points, chain, spacing, ends)
    waves = rng.uniform(15, 50, (len(stroke_of), 2))
    sway = (
        rng.normal(0, 1, (len(stroke_of), 2)) * (c.wobble / math.sqrt(2) * (0.5 + sloppy))[:, None]
    )
    phase = rng.uniform(0, 2 * math.pi, (len(stroke_of), 3))
    offset = (
        sway[chain] * np.sin(2 * math.pi * arc[:, None] / waves[chain] + phase[chain, :2])
    ).sum(1)
    points = points + offset[:, None] * _normals(points, chain)

    # The pen: pressure along each stroke and tapered ends.
    period = rng.uniform(30, 90, len(stroke_of))
    profile = 1 + pressure * np.sin(2 * math.pi * arc / period[chain] + phase[chain, 2])
    profile *= 1 - taper_in * np.clip(1 - u / 0.2, 0, 1)
    profile *= 1 - taper_out * np.clip(1 - (1 - u) / 0.25, 0, 1)
    radius = width / 2 * rng.normal(1.0, 0.1, len(stroke_of))[chain] * np.maximum(profile, 0.2)

    # The paper: elastic distortion, then one affine map, onto the canvas.
    points = _elastic(points, rng.uniform(0, c.elastic), rng)
    centre, canvas = KANJIVG_BOX / 2, c.image_size * c.supersample
    to_canvas = canvas / KANJIVG_BOX
    shift = rng.uniform(-c.translation, c.translation, 2)
    xy = ((points - centre) @ _affine(c, rng).T + centre + shift) * to_canvas
    image = Image.new("L", (canvas, canvas), 0)
    joins = rng.random(len(stroke_of)) < c.ligature * speed
    _draw_pen(ImageDraw.Draw(image), xy, np.maximum(radius * to_canvas, 0.5), chain, joins)

    # The scanner: blur, binarise, reduce (sometimes to a coarse grid first).
    sigma = rng.uniform(*c.blur) * float(np.median(radius))
    if sigma > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(sigma))
    level = round(255 * rng.uniform(*c.threshold))
    image = image.point(_threshold_table(level))
    if rng.random() < c.low_resolution:
        side = int(rng.integers(c.scan_size[0], c.scan_size[1] + 1))
        image = image.resize((side, side), Image.BOX).resize((c.image_size,) * 2, Image.BICUBIC)
    elif c.supersample > 1:
        image = image.reduce(c.supersample)
    return np.asarray(image, dtype=np.uint8)


@lru_cache(maxsize=256)
def _threshold_table(level: int) -> list[int]:
    return [255 if v >= level else 0 for v in range(256)]


@dataclass(frozen=True)
class MixedConfig:
    """Both styles in one data set: each drawing is a handwriting-style one with probability
    ``handwriting_share``, else a classic one (``render_style="mixed"``).

    Meant for a teacher that should keep the classic renders' in-domain accuracy and still meet
    real pen strokes; a drawing's style is drawn from its own random stream, so the data set is
    as fixed as either style's.
    """

    image_size: int = 28
    handwriting_share: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.handwriting_share < 1:
            raise ValueError(
                f"handwriting_share is a probability in (0, 1) (0 or 1: use render_style "
                f"'classic' or 'handwriting'), got {self.handwriting_share}."
            )

    @cached_property
    def styles(self) -> tuple[RenderConfig, HandwritingConfig]:
        """The classic and the handwriting style at this image size."""
        return RenderConfig(image_size=self.image_size), HandwritingConfig(self.image_size)

    def as_dict(self) -> dict:
        """The share and both styles' parameters: what the cache key hashes."""
        classic, handwriting = self.styles
        return {
            "style": "mixed",
            "handwriting_share": self.handwriting_share,
            "classic": classic.as_dict(),
            "handwriting": handwriting.as_dict(),
        }

    def draw(self, kanji: KanjiStrokes, rng: np.random.Generator) -> np.ndarray:
        classic, handwriting = self.styles
        style = handwriting if rng.random() < self.handwriting_share else classic
        return style.draw(kanji, rng)
