"""Simple characters (kana and kanji components) as extra KanjiVG training classes."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_metakd.data import KanjiDataModule
from lightning_metakd.data.kanji import select_kanji
from lightning_metakd.data.kanji_render import KanjiStrokes, kanjivg_files, parse_kanji_svg
from lightning_metakd.data.kanji_simple import (
    COMPONENT_SPAN,
    HELD_OUT,
    MAX_COMPONENT_SCALE,
    components,
    cut_component,
    is_simple_group,
    kana,
    simple_characters,
)

# 12 radical groups x 4 characters x 3 drawings, with and without the simple characters of <= 2
# strokes (about 80 more classes).
SMALL = dict(
    ways=3,
    shots=1,
    queries=1,
    meta_batch_size=2,
    steps_per_epoch=2,
    val_episodes=2,
    test_episodes=2,
    max_classes=48,
    max_classes_per_group=4,
    samples_per_class=3,
    split_fractions=(0.5, 0.25, 0.25),
)


@pytest.fixture(scope="module")
def two_modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[KanjiDataModule, ...]:
    cache = str(tmp_path_factory.mktemp("kanji_simple"))
    return KanjiDataModule(cache_dir=cache, **SMALL), KanjiDataModule(
        cache_dir=cache, simple_characters=2, **SMALL
    )


def test_components_are_read_from_the_svg_groups() -> None:
    """林 is two whole 木 parts of four strokes each; the character's own group is not one."""
    forest = parse_kanji_svg(kanjivg_files()[ord("林")])
    assert forest.components == (("木", (0, 1, 2, 3)), ("木", (4, 5, 6, 7)))
    assert forest.kind == "kanji" and forest.class_name == "kanji:U+6797"


def test_kana_are_the_base_forms_of_both_scripts() -> None:
    found = kana(max_strokes=4)
    characters = {k.character for k in found}
    assert {"あ", "ア", "の", "ロ"} <= characters
    assert not characters & set("ぁァっッゃャ")  # small kana: the large ones drawn smaller
    assert not {c for c in characters if len(unicodedata.normalize("NFD", c)) > 1}  # が, パ ...
    assert {k.radical for k in found} == {"simple:hiragana", "simple:katakana"}
    assert all(k.num_strokes <= 4 and k.class_name.startswith("kana:U+") for k in found)
    assert max(k.num_strokes for k in kana(max_strokes=2)) == 2


def test_a_component_is_cut_out_centred_and_scaled_to_the_box() -> None:
    """Two strokes of a three-stroke character, spanning 10 x 5 units at (20..30, 40..45)."""
    chains = (
        np.array([[20, 40], [30, 40], [30, 40], [30, 45]], np.float32),  # stroke 1
        np.array([[0, 0], [1, 1], [2, 2], [3, 3]], np.float32),  # stroke 0, left out
        np.array([[25, 42], [25, 42], [25, 42], [25, 42]], np.float32),  # stroke 2
    )
    character = KanjiStrokes(0x4E00, chains, (1, 0, 2), "木")
    cut = cut_component(character, "丁", strokes=(1, 2))
    scale = min(MAX_COMPONENT_SCALE, COMPONENT_SPAN / 10)  # 4: the cap
    assert scale == 4.0
    np.testing.assert_allclose(cut.chains[0][0], [54.5 - 5 * scale, 54.5 - 2.5 * scale])
    np.testing.assert_allclose(cut.chains[1][0], [54.5, 54.5 - 0.5 * scale])
    assert cut.chain_stroke == (0, 1) and cut.num_strokes == 2
    assert (cut.codepoint, cut.kind, cut.source, cut.radical) == (
        ord("丁"),
        "component",
        "木",
        "simple:components-2 strokes",
    )
    wide = KanjiStrokes(
        1, (np.array([[0, 0], [50, 0], [50, 20], [50, 20]], np.float32),), (0,), "x"
    )
    points = cut_component(wide, "丁", (0,)).chains[0]
    np.testing.assert_allclose(points.max(0) - points.min(0), [COMPONENT_SPAN, 36.0], rtol=1e-6)


def test_components_are_never_characters_of_the_data_set_nor_kana_or_latin() -> None:
    selected = select_kanji(max_classes_per_group=4, max_classes=48)
    found = components(selected, max_strokes=3)
    own = {k.character for k in selected}
    assert found and not {k.character for k in found} & own
    assert all(k.num_strokes <= 3 and len(k.character) == 1 for k in found)
    everything = simple_characters(selected, max_strokes=3)
    assert min(k.codepoint for k in everything) >= 0x2E80  # no KanjiVG Latin letters or digits
    by_code = {k.codepoint: k for k in selected}
    for k in found:  # cut out of the first selected character (by code point) holding it whole
        holders = [
            c for c in sorted(by_code) if any(e == k.character for e, _ in by_code[c].components)
        ]
        assert by_code[holders[0]].radical == k.source


def test_simple_characters_join_training_only(two_modules) -> None:
    plain, simple = (m.build_splits() for m in two_modules)
    for split in ("val", "test"):  # the evaluation episodes are unchanged
        assert simple[split].class_names == plain[split].class_names
        assert torch.equal(simple[split].images, plain[split].images)
        assert not any(is_simple_group(g) for g in simple[split].groups)
    n = plain["train"].num_classes
    assert simple["train"].class_names[:n] == plain["train"].class_names
    assert torch.equal(simple["train"].images[: len(plain["train"].images)], plain["train"].images)
    extra = simple["train"].class_names[n:]
    assert extra and all(name.split(":")[0] in ("kana", "component") for name in extra)
    groups = {g for g in simple["train"].groups if is_simple_group(g)}
    assert "simple:hiragana" in groups and HELD_OUT not in groups
    assert sum(len(simple["train"].groups[g]) for g in groups) == len(extra)


def test_components_of_held_out_groups_are_left_out(two_modules) -> None:
    plain, simple = two_modules
    data = simple.load_or_render()
    parts = simple.split_groups([r for r in data["radicals"].tolist() if not is_simple_group(r)])
    held_out = set(parts["val"]) | set(parts["test"])
    cut = [
        (name, source, character)
        for name, source, character in zip(
            data["class_names"].tolist(),
            data["sources"].tolist(),
            data["characters"].tolist(),
            strict=True,
        )
        if name.startswith("component:")
    ]
    dropped = {
        name for name, source, character in cut if source in held_out or character in held_out
    }
    assert dropped and len(dropped) < len(cut)  # the small split holds some of both
    trained = set(simple.build_splits()["train"].class_names)
    assert not dropped & trained
    assert {name for name, _, _ in cut} - dropped <= trained


def test_simple_characters_have_their_own_cache_and_leave_the_default_key(two_modules) -> None:
    plain, simple = two_modules
    assert "simple_characters" not in plain.cache_params  # existing caches keep their names
    assert simple.cache_params["simple_characters"] == 2
    assert plain.cache_path != simple.cache_path
    assert "sources" not in plain.load_or_render()


@pytest.mark.parametrize("bad", [-1, 1.5, True, "6"])
def test_a_bad_stroke_count_is_one_line_naming_the_fix(bad, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"simple_characters is a number of strokes .*e\.g\. "):
        KanjiDataModule(cache_dir=str(tmp_path), simple_characters=bad)
