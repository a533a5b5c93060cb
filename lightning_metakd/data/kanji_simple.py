"""Simple characters from KanjiVG: kana and the building blocks of kanji, as extra training classes.

Real handwriting a user brings — digits, letters, symbols — is mostly simple: one to four strokes,
drawn large in the frame. Kanji are not (median 12 strokes), so a model meta-trained on them alone
has seen few shapes like a handwritten ``2`` or ``8``. KanjiVG holds two sources of simple
characters beside its kanji (issue #17's "simpler characters: single radicals and components are
Omniglot-sized"):

- **kana**: the hiragana and katakana (base forms only: no small kana, which are the large ones
  drawn smaller, and no voiced forms, which are a base form plus two dots), curved strokes like
  digits and letters;
- **components**: the ``<g kvg:element>`` parts of every kanji (radical forms such as 氵 or 亻 and
  other building blocks, :attr:`~lightning_metakd.data.kanji_render.KanjiStrokes.components`),
  each cut out of the first character that has it and scaled to fill the box.

:func:`simple_characters` lists them as :class:`~lightning_metakd.data.kanji_render.KanjiStrokes`
that the renderers draw like any kanji. They only ever join the *training* split
(``KanjiDataModule(simple_characters=N)``), in groups of their own — kana by script, components by
stroke count — so that a task drawn from one group is as fine-grained as one drawn from a radical.
What would leak into evaluation is left out: a component that is itself a character of the data
set (whatever its split) is not a component class, and :meth:`~lightning_metakd.data.
KanjiDataModule.build_splits` drops the components cut out of a validation or test character and
those that are the radical of a validation or test group. KanjiVG's Latin letters and digits are
never used (the real-handwriting tests are digits).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from lightning_metakd.data.kanji_render import KANJIVG_BOX, KanjiStrokes, load_kanjivg

#: Group names of the simple characters start with this (they never name a radical).
SIMPLE_GROUP_PREFIX = "simple:"
#: The group of the components no split takes (see the module docs).
HELD_OUT = f"{SIMPLE_GROUP_PREFIX}held out"
#: A component's drawing is scaled so that its longer side spans this much of the 109-unit box
#: (about what a kanji spans), by at most :data:`MAX_COMPONENT_SCALE`.
COMPONENT_SPAN = 90.0
MAX_COMPONENT_SCALE = 4.0

_SCRIPTS = {"hiragana": (0x3041, 0x3096), "katakana": (0x30A1, 0x30FA)}
_SMALL_KANA = set("ぁぃぅぇぉっゃゅょゎゕゖァィゥェォッャュョヮヵヶ")


def _script_of(codepoint: int) -> str | None:
    """``"hiragana"`` or ``"katakana"`` for a code point in their Unicode block, else ``None``."""
    for script, (low, high) in _SCRIPTS.items():
        if low <= codepoint <= high:
            return script
    return None


def is_simple_group(group: str) -> bool:
    """Whether a group name is one of the simple characters' (never a radical's)."""
    return group.startswith(SIMPLE_GROUP_PREFIX)


def kana(max_strokes: int) -> list[KanjiStrokes]:
    """The base hiragana and katakana of at most ``max_strokes`` strokes, grouped by script."""
    found = []
    for character in load_kanjivg():
        script, text = _script_of(character.codepoint), character.character
        if (
            script is None
            or character.num_strokes > max_strokes
            or text in _SMALL_KANA
            or len(unicodedata.normalize("NFD", text)) > 1
        ):
            continue
        found.append(replace(character, radical=f"{SIMPLE_GROUP_PREFIX}{script}", kind="kana"))
    return found


def fill_box(chains: Sequence[np.ndarray], max_scale: float = math.inf) -> tuple[np.ndarray, ...]:
    """``chains`` of points ``[n, 2]`` moved and scaled together (aspect ratio kept, by at most
    ``max_scale``) so that their points' longer side spans :data:`COMPONENT_SPAN` units, centred
    in the 109-unit box; float32, as KanjiVG's chains are."""
    points = np.concatenate(chains)
    low, high = points.min(0), points.max(0)
    scale = min(max_scale, COMPONENT_SPAN / max(float((high - low).max()), 1e-6))
    centre = KANJIVG_BOX / 2
    return tuple(((c - (low + high) / 2) * scale + centre).astype(np.float32) for c in chains)


def cut_component(character: KanjiStrokes, element: str, strokes: Sequence[int]) -> KanjiStrokes:
    """The strokes ``strokes`` of ``character`` alone, centred and scaled to fill the box.

    The longer side of the strokes' Bézier points becomes :data:`COMPONENT_SPAN` units (scaled by
    at most :data:`MAX_COMPONENT_SCALE`, so that a dot stays a stroke); the aspect ratio is kept.
    ``radical`` names the component's group (``"simple:components-<n> strokes"``) and
    ``source`` the radical group of the character it was cut from.
    """
    keep = set(strokes)
    picked = [
        (c, s) for c, s in zip(character.chains, character.chain_stroke, strict=True) if s in keep
    ]
    chains = fill_box([c for c, _ in picked], MAX_COMPONENT_SCALE)
    order = {s: i for i, s in enumerate(sorted(keep))}
    return KanjiStrokes(
        ord(element),
        chains,
        tuple(order[s] for _, s in picked),
        f"{SIMPLE_GROUP_PREFIX}components-{len(keep)} strokes",
        kind="component",
        source=character.radical,
    )


def components(selected: Sequence[KanjiStrokes], max_strokes: int) -> list[KanjiStrokes]:
    """One class per component of ``selected`` of at most ``max_strokes`` strokes.

    A component is a single-character ``kvg:element`` that is not one of the ``selected``
    characters (nor a kana), cut out of the first selected character (by code point) that holds
    it whole. Sorted by code point.
    """
    characters = {k.character for k in selected}
    first: dict[str, tuple[KanjiStrokes, tuple[int, ...]]] = {}
    for character in sorted(selected, key=lambda k: k.codepoint):
        for element, strokes in character.components:
            if (
                len(element) == 1
                and element not in characters
                and element not in first
                and len(strokes) <= max_strokes
                and _script_of(ord(element)) is None
            ):
                first[element] = (character, strokes)
    return [cut_component(k, e, s) for e, (k, s) in sorted(first.items(), key=lambda i: ord(i[0]))]


def check_simple_strokes(max_strokes: int) -> int:
    """``max_strokes`` if it is a whole number of strokes of at least 1, else a one-line error."""
    if not isinstance(max_strokes, int) or isinstance(max_strokes, bool) or max_strokes < 1:
        raise ValueError(
            f"simple_characters is a number of strokes (at least 1; 0 for none), got "
            f"{max_strokes!r}; e.g. simple_characters: 6."
        )
    return max_strokes


def simple_characters(selected: Sequence[KanjiStrokes], max_strokes: int) -> list[KanjiStrokes]:
    """Kana, then components, of at most ``max_strokes`` strokes: the extra training classes."""
    check_simple_strokes(max_strokes)
    return kana(max_strokes) + components(selected, max_strokes)


__all__ = [
    "HELD_OUT",
    "SIMPLE_GROUP_PREFIX",
    "check_simple_strokes",
    "components",
    "cut_component",
    "fill_box",
    "is_simple_group",
    "kana",
    "simple_characters",
]
