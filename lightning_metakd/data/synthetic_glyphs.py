"""Synthetic glyphs: random pen shapes with the loops and curves of digits, as extra training classes.

Kanji and their components are made of straight strokes, hooks and ticks; closed loops and long
curves — the ``0``, ``6``, ``8`` and ``9`` of a hand-written digit — hardly occur in them (the kana
have a few). A model meta-trained on KanjiVG alone has seen few such shapes, which is one reading
of why it transfers worse to real hand-written digits than to hand-written kanji (issue #17,
``docs/pretrained.md``). This module makes shapes of that kind from a seed: each glyph is one to
three pen strokes, each a closed loop (an ellipse of four cubic segments whose anchors wander), a
smooth open curve (one to three cubic segments through random points, the tangents continuous) or
a straight line, placed at random in the box and scaled so that its longer side spans
:data:`~lightning_metakd.data.kanji_simple.COMPONENT_SPAN` units like a cut-out component.

:func:`synthetic_glyphs` returns them as :class:`~lightning_metakd.data.kanji_render.KanjiStrokes`
(``kind="synthetic"``, code points from U+F0000 in a Private Use Area, so their class names never
meet a real character's), which every render style draws like a kanji: the same pen, wobble and
scanner. ``KanjiDataModule(synthetic_characters=N)`` adds ``N`` of them to the *training* split
only, grouped by stroke count and whether a loop is among the strokes (``"simple:synthetic-2
strokes, with loops"``: six groups, each of at least 20 glyphs at 400) so that a task drawn from
a group compares glyphs of one make-up. Nothing about them comes from the
evaluation data: they are the same for every split seed and data set.
"""

from __future__ import annotations

import math

import numpy as np

from lightning_metakd.data.kanji_render import KanjiStrokes
from lightning_metakd.data.kanji_simple import SIMPLE_GROUP_PREFIX, fill_box

#: The first code point of the glyphs (Supplementary Private Use Area-A).
FIRST_CODEPOINT = 0xF0000
#: Seed of the glyph shapes (fixed: the shapes are part of the data set, like the render seed).
GLYPH_SEED = 17
#: Bump whenever the shapes change: a render cache keyed by an older version is then ignored.
GLYPH_VERSION = 1
#: Chances of a glyph having 1, 2 or 3 strokes, and of a stroke being a loop, a curve or a line.
STROKE_COUNTS = {1: 0.45, 2: 0.4, 3: 0.15}
STROKE_KINDS = {"loop": 0.35, "curve": 0.45, "line": 0.2}


def _loop(rng: np.random.Generator) -> np.ndarray:
    """A closed loop: four cubic segments on a rotated ellipse, anchors moved in and out."""
    centre = rng.uniform(0.3, 0.7, 2)
    radii = rng.uniform(0.12, 0.35, 2)
    turn = rng.uniform(0, 2 * math.pi)
    start = rng.uniform(0, 2 * math.pi)
    angles = start + np.arange(4) * (math.pi / 2) * rng.uniform(0.85, 1.15, 4)
    angles = np.append(angles, start + 2 * math.pi)
    wobble = np.append(rng.uniform(0.8, 1.2, 4), 0.0)
    wobble[-1] = wobble[0]
    unit = np.stack([np.cos(angles), np.sin(angles)], 1) * wobble[:, None]
    tangent = np.stack([-np.sin(angles), np.cos(angles)], 1) * wobble[:, None]
    kappa = 4 / 3 * np.tan(np.diff(angles) / 4)  # the cubic that follows a circular arc
    points = [unit[0]]
    for i in range(4):
        points += [unit[i] + kappa[i] * tangent[i], unit[i + 1] - kappa[i] * tangent[i + 1]]
        points.append(unit[i + 1])
    rotation = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]])
    return centre + (np.asarray(points) * radii) @ rotation.T


def _curve(rng: np.random.Generator) -> np.ndarray:
    """An open smooth curve: 1-3 cubic segments through random anchors, tangents continuous."""
    segments = int(rng.integers(1, 4))
    anchors = rng.uniform(0.1, 0.9, (segments + 1, 2))
    tangents = rng.normal(0.0, 0.18, (segments + 1, 2))
    points = [anchors[0]]
    for i in range(segments):
        points += [anchors[i] + tangents[i], anchors[i + 1] - tangents[i + 1], anchors[i + 1]]
    return np.asarray(points)


def _line(rng: np.random.Generator) -> np.ndarray:
    """A straight stroke as one cubic segment (control points on the line)."""
    a, b = rng.uniform(0.1, 0.9, (2, 2))
    return np.stack([a, a + (b - a) / 3, a + 2 * (b - a) / 3, b])


_MAKERS = {"loop": _loop, "curve": _curve, "line": _line}


def synthetic_glyph(index: int, seed: int = GLYPH_SEED) -> KanjiStrokes:
    """Glyph ``index`` of the family ``seed``: the same strokes whatever else is asked for."""
    rng = np.random.default_rng([seed, index])
    count = int(rng.choice(list(STROKE_COUNTS), p=list(STROKE_COUNTS.values())))
    kinds = rng.choice(list(STROKE_KINDS), size=count, p=list(STROKE_KINDS.values()))
    strokes = [_MAKERS[str(kind)](rng) for kind in kinds]
    chains = fill_box(strokes)
    looped = "with loops" if "loop" in kinds else "no loops"
    group = f"{SIMPLE_GROUP_PREFIX}synthetic-{count} stroke{'s' * (count > 1)}, {looped}"
    return KanjiStrokes(
        FIRST_CODEPOINT + index, chains, tuple(range(count)), group, kind="synthetic"
    )


def check_synthetic_count(count: int) -> int:
    """``count`` if it is a whole number of glyphs from 0 to 65,534, else a one-line error."""
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= 0xFFFE:
        raise ValueError(
            f"synthetic_characters is a number of glyph classes (0 to 65534; 0 for none), got "
            f"{count!r}; e.g. synthetic_characters: 400."
        )
    return count


def cache_key(count: int) -> dict[str, int]:
    """What a render of ``count`` glyphs depends on, for the cache file's name."""
    return {"count": check_synthetic_count(count), "seed": GLYPH_SEED, "version": GLYPH_VERSION}


def synthetic_glyphs(count: int, seed: int = GLYPH_SEED) -> list[KanjiStrokes]:
    """The first ``count`` glyphs of the family ``seed`` (:func:`synthetic_glyph`)."""
    return [synthetic_glyph(i, seed) for i in range(check_synthetic_count(count))]


__all__ = [
    "FIRST_CODEPOINT",
    "GLYPH_SEED",
    "GLYPH_VERSION",
    "cache_key",
    "check_synthetic_count",
    "synthetic_glyph",
    "synthetic_glyphs",
]
