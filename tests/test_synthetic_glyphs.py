"""Synthetic glyphs (random loops, curves and lines) as extra KanjiVG training classes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from test_kanji_simple import SMALL  # the same small KanjiVG selection

from lightning_metakd.data import KanjiDataModule
from lightning_metakd.data.kanji_handwriting import MixedConfig
from lightning_metakd.data.kanji_render import KANJIVG_BOX, RenderConfig, sample_rng
from lightning_metakd.data.kanji_simple import COMPONENT_SPAN, is_simple_group
from lightning_metakd.data.synthetic_glyphs import (
    FIRST_CODEPOINT,
    _line,
    _loop,
    synthetic_glyph,
    synthetic_glyphs,
)


def test_a_glyph_is_the_same_whatever_else_is_asked_for() -> None:
    few, many = synthetic_glyphs(5), synthetic_glyphs(50)
    for a, b in zip(few, many[:5], strict=True):
        assert a.chain_stroke == b.chain_stroke
        assert all(np.array_equal(x, y) for x, y in zip(a.chains, b.chains, strict=True))
    assert not np.array_equal(many[0].chains[0], many[1].chains[0])
    assert [g.codepoint for g in many] == list(range(FIRST_CODEPOINT, FIRST_CODEPOINT + 50))
    assert many[3].class_name == f"synthetic:U+{FIRST_CODEPOINT + 3:04X}"


def test_strokes_are_cubic_chains_scaled_and_centred_like_a_component() -> None:
    for glyph in synthetic_glyphs(40):
        assert 1 <= glyph.num_strokes <= 3 and glyph.kind == "synthetic"
        assert all((len(chain) - 1) % 3 == 0 and len(chain) >= 4 for chain in glyph.chains)
        points = np.concatenate(glyph.chains)
        low, high = points.min(0), points.max(0)
        assert float((high - low).max()) == pytest.approx(COMPONENT_SPAN, abs=1e-3)
        np.testing.assert_allclose((low + high) / 2, KANJIVG_BOX / 2, atol=1e-3)


def test_a_loop_closes_and_a_line_is_straight() -> None:
    """A loop is four cubic segments that end where they began (to rounding: the last anchor is
    the first one's angle plus 2π); a line's handles sit at its thirds."""
    points = _loop(np.random.default_rng(3))
    assert points.shape == (13, 2)
    np.testing.assert_allclose(points[0], points[-1], atol=1e-12)
    assert np.linalg.norm(points[6] - points[0]) > 0.1  # it goes somewhere on the way
    line = _line(np.random.default_rng(4))
    a, b = line[0], line[-1]
    np.testing.assert_allclose(line[1:3], [a + (b - a) / 3, a + 2 * (b - a) / 3])


def test_the_groups_split_by_strokes_and_loops_and_each_trains_20_way() -> None:
    counts = Counter(g.radical for g in synthetic_glyphs(400))
    assert set(counts) == {
        f"simple:synthetic-{n} stroke{'s' * (n > 1)}, {loops}"
        for n in (1, 2, 3)
        for loops in ("with loops", "no loops")
    }
    assert min(counts.values()) >= 20 and sum(counts.values()) == 400


@pytest.mark.parametrize("style", [RenderConfig(), MixedConfig()], ids=["classic", "mixed"])
def test_every_style_draws_them(style) -> None:
    glyph = synthetic_glyph(7)
    image = style.draw(glyph, sample_rng(0, glyph.codepoint, 0))
    assert image.shape == (28, 28) and image.dtype == np.uint8
    assert 10 < (image > 127).sum() < 28 * 28 // 2


@pytest.fixture(scope="module")
def two_modules(tmp_path_factory: pytest.TempPathFactory) -> tuple[KanjiDataModule, ...]:
    cache = str(tmp_path_factory.mktemp("synthetic"))
    return KanjiDataModule(cache_dir=cache, **SMALL), KanjiDataModule(
        cache_dir=cache, synthetic_characters=30, **SMALL
    )


def test_synthetic_glyphs_join_training_only(two_modules) -> None:
    plain, synthetic = (m.build_splits() for m in two_modules)
    for split in ("val", "test"):
        assert synthetic[split].class_names == plain[split].class_names
        assert torch.equal(synthetic[split].images, plain[split].images)
    n = plain["train"].num_classes
    assert synthetic["train"].class_names[:n] == plain["train"].class_names
    extra = synthetic["train"].class_names[n:]
    assert extra == [f"synthetic:U+{FIRST_CODEPOINT + i:04X}" for i in range(30)]
    groups = {g for g in synthetic["train"].groups if is_simple_group(g)}
    assert groups and sum(len(synthetic["train"].groups[g]) for g in groups) == 30


def test_the_summary_counts_their_groups_apart_from_radicals(two_modules) -> None:
    plain, synthetic = two_modules
    for module in two_modules:
        module.setup()
    radicals = plain.describe_splits().splitlines()[1].split("images")[1].strip()
    assert radicals == "6 radicals"  # 12 groups x (0.5, 0.25, 0.25)
    groups = {g for g in synthetic.splits["train"].groups if is_simple_group(g)}
    line = synthetic.describe_splits().splitlines()[1]
    assert line.endswith(f"images    6 radicals + {len(groups)} simple-character groups")
    assert "simple" not in synthetic.describe_splits().splitlines()[2]  # val: radicals only


def test_they_have_their_own_cache_and_leave_the_default_key(two_modules) -> None:
    plain, synthetic = two_modules
    assert "synthetic_characters" not in plain.cache_params
    assert synthetic.cache_params["synthetic_characters"] == {"count": 30, "seed": 17, "version": 1}
    assert plain.cache_path != synthetic.cache_path
    assert synthetic.load_or_render()["sources"].tolist()[-30:] == [""] * 30


@pytest.mark.parametrize("bad", [-1, 1.5, True, "400", 70000])
def test_a_bad_count_is_one_line_naming_the_fix(bad, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"synthetic_characters is a number of glyph classes"):
        KanjiDataModule(cache_dir=str(tmp_path), synthetic_characters=bad)
