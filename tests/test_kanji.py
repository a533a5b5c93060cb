"""KanjiVG parsing, rendering, the on-disk cache and KanjiDataModule (tiny renders only)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_together

from lightning_metakd.data import KanjiDataModule
from lightning_metakd.data import kanji as kanji_module
from lightning_metakd.data import kanji_render as render_module
from lightning_metakd.data.kanji import default_cache_dir, select_kanji
from lightning_metakd.data.kanji_handwriting import (
    HANDWRITING_VERSION,
    HandwritingConfig,
    MixedConfig,
)
from lightning_metakd.data.kanji_render import (
    RenderConfig,
    chain_polylines,
    kanjivg_files,
    load_kanjivg,
    parse_kanji_svg,
    parse_path,
    render_kanji,
    render_samples,
    round_joint_line,
    sample_rng,
)

# 6 radical groups x 6 characters x 6 drawings: 216 images, rendered once per test module.
SMALL = dict(
    ways=3,
    shots=1,
    queries=2,
    meta_batch_size=4,
    steps_per_epoch=3,
    val_episodes=4,
    test_episodes=4,
    max_classes=36,
    max_classes_per_group=6,
    samples_per_class=6,
)


def by_codepoint() -> dict[int, object]:
    return {k.codepoint: k for k in load_kanjivg()}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("kanji_cache")
    KanjiDataModule(cache_dir=str(path), **SMALL).prepare_data()
    return path


# --- parsing -------------------------------------------------------------------------------------


def test_parse_path_absolute_relative_smooth_and_implicit_repeats() -> None:
    (chain,) = parse_path("M10,20c1,0,2,0,3,0s2,1,3,1 1,1,2,2")
    assert chain.shape == (1 + 3 * 3, 2)
    np.testing.assert_allclose(chain[:4], [[10, 20], [11, 20], [12, 20], [13, 20]])
    # s reflects the previous second control point (12, 20) about the current point (13, 20).
    np.testing.assert_allclose(chain[4:7], [[14, 20], [15, 21], [16, 21]])
    # an implicit second "s" (no letter): relative to (16, 21), reflecting (15, 21).
    np.testing.assert_allclose(chain[7:10], [[17, 21], [17, 22], [18, 23]])
    (absolute,) = parse_path("M1,2C3,4,5,6,7,8S9,10,11,12")
    np.testing.assert_allclose(absolute[4], [9, 10])  # 2 * (7, 8) - (5, 6)


def test_parse_path_rejects_unsupported_commands() -> None:
    with pytest.raises(ValueError, match="Unsupported SVG path command 'L'"):
        parse_path("M0,0L10,10")
    with pytest.raises(ValueError, match="multiple of 6"):
        parse_path("M0,0c1,2,3")


def test_parse_real_svgs() -> None:
    files = kanjivg_files()
    assert all("-" not in path.stem for path in files.values())
    go = parse_kanji_svg(files[ord("語")])
    assert go.character == "語" and go.class_name == "kanji:U+8A9E"
    assert go.num_strokes == 14 and go.radical == "言"
    one = parse_kanji_svg(files[0x4E00])
    assert one.num_strokes == 1 and one.radical == "一"
    hiragana_a = parse_kanji_svg(files[ord("あ")])
    assert hiragana_a.num_strokes == 3 and hiragana_a.radical is None
    for kanji in (go, one, hiragana_a):
        points = np.concatenate(kanji.chains)
        assert points.min() >= 0 and points.max() <= 109


def test_library_and_group_selection() -> None:
    library = load_kanjivg()
    assert 6000 < len(library) < 8000
    assert all(k.num_strokes >= 1 for k in library)
    selected = select_kanji(min_group_size=10)
    radicals = [k.radical for k in selected]
    sizes = {r: radicals.count(r) for r in dict.fromkeys(radicals)}
    assert min(sizes.values()) >= 10 and "言" in sizes and len(sizes) > 100
    assert list(sizes.values()) == sorted(sizes.values(), reverse=True)  # largest groups first
    capped = select_kanji(min_group_size=10, max_classes_per_group=4, max_classes=10)
    assert [k.radical for k in capped] == [radicals[0]] * 4 + [list(sizes)[1]] * 4 + [
        list(sizes)[2]
    ] * 2


# --- rendering -----------------------------------------------------------------------------------


def test_render_is_deterministic_per_class_and_sample() -> None:
    go = by_codepoint()[ord("語")]
    config = RenderConfig()
    a = render_kanji(go, config, sample_rng(0, go.codepoint, 3))
    b = render_kanji(go, config, sample_rng(0, go.codepoint, 3))
    assert a.shape == (28, 28) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, render_kanji(go, config, sample_rng(0, go.codepoint, 4)))
    assert not np.array_equal(a, render_kanji(go, config, sample_rng(1, go.codepoint, 3)))
    # white strokes on a black background
    assert a.max() > 200 and np.median(a) < 10 and a[0, 0] == 0
    small = render_kanji(go, RenderConfig(image_size=20), sample_rng(0, go.codepoint, 3))
    assert small.shape == (20, 20)


# Computed from the renderer before the handwriting style was added (PIL 13.0, kanjivg 20260714):
# every README number and the bit-exact quickstart reproduction depend on these drawings.
DEFAULT_CACHE_NAME = "kanjivg-v1-28px-20x-c1858d7f843f93ff.npz"
DEFAULT_RENDER = {
    "curve_samples": 8,
    "image_size": 28,
    "point_jitter": 1.5,
    "rotation": 10.0,
    "scale": 0.12,
    "shear": 0.15,
    "stroke_offset": 1.5,
    "stroke_width": [3.0, 6.0],
    "supersample": 4,
    "translation": 7.5,
}
DEFAULT_SAMPLES_SHA256 = "11db71d429c6a7ce668bf2457c3309ae03e240bd27f0c90c8097c55abbb8c4f4"
DEFAULT_DRAWINGS = {  # character: (sha256 of drawing 5, its pixel sum)
    "語": ("25704d7b646818f5129089414b6aca4fc73bae71bf115b20ee6924c36d271dbc", 36481),
    "一": ("cf36c94b415fc493d97963e431305dc410b2946867c82cf29a4e277a047dd4ab", 3494),
    "あ": ("9ed054c4f2f197363ea11adfe2a2060bd3998ecc720248da7ad34e7029afe0e8", 23685),
}


def test_default_cache_key_and_drawings_are_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default render is frozen: same cache file name (so users' caches stay valid), same
    render parameters, and bit-identical drawings of a sample of characters."""
    monkeypatch.setattr(kanji_module, "kanjivg_version", lambda: "20260714")
    dm = KanjiDataModule(cache_dir="/nonexistent")
    assert dm.cache_path.name == DEFAULT_CACHE_NAME
    assert dm.cache_params["render"] == DEFAULT_RENDER
    assert dm.cache_params["format_version"] == 1
    kanji = select_kanji(max_classes_per_group=2, max_classes=8)
    assert "".join(k.character for k in kanji) == "彬木氵氾募墓扌才"
    images = render_samples(kanji, 3, RenderConfig(), progress=False)
    assert hashlib.sha256(images.tobytes()).hexdigest() == DEFAULT_SAMPLES_SHA256
    lib = by_codepoint()
    for character, (digest, total) in DEFAULT_DRAWINGS.items():
        k = lib[ord(character)]
        drawing = render_kanji(k, RenderConfig(), sample_rng(0, k.codepoint, 5))
        assert (hashlib.sha256(drawing.tobytes()).hexdigest(), int(drawing.sum())) == (
            digest,
            total,
        ), character


@pytest.mark.slow
def test_render_samples_are_the_same_in_two_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spawned render workers give the single process's bytes (each worker imports the package
    with torch first: seconds each, hence slow)."""
    monkeypatch.setattr(render_module, "PARALLEL_RENDER_IMAGES", 1)
    kanji = select_kanji(max_classes_per_group=2, max_classes=8)
    for config in (RenderConfig(), HandwritingConfig()):
        alone = render_samples(kanji, 3, config, progress=False)
        shared = render_samples(kanji, 3, config, progress=False, processes=2)
        np.testing.assert_array_equal(shared, alone)
    images = render_samples(kanji, 3, RenderConfig(), progress=False, processes=2)
    assert hashlib.sha256(images.tobytes()).hexdigest() == DEFAULT_SAMPLES_SHA256


def test_render_samples_do_not_depend_on_batching() -> None:
    lib = by_codepoint()
    first, second = lib[ord("語")], lib[ord("話")]
    both = render_samples([first, second], 3, RenderConfig(), progress=False)
    alone = render_samples([second], 3, RenderConfig(), progress=False)
    assert both.shape == (6, 1, 28, 28)
    np.testing.assert_array_equal(both[3:], alone)
    assert not np.array_equal(both[0], both[1])


@pytest.mark.parametrize("width", [1, 3, 4, 5, 6, 7, 8, 9, 12])
def test_round_joint_line_is_pillows_curve_joint_pixel_for_pixel(width: int) -> None:
    """The render's fast polyline equals ``ImageDraw.line(..., joint="curve")`` on random
    wiggly lines of every width (joints from 5 px; above 8 Pillow itself draws them), with
    straight runs (no joint) and sharp turns both ways."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(width)
    for trial in range(20):
        steps = rng.normal(0, 6, (int(rng.integers(2 if trial % 4 else 8, 40)), 2)).cumsum(0) + 56
        if trial % 4 == 0:  # a straight run: equal angles, where Pillow draws no joint
            steps[3:6] = steps[2] + np.arange(1, 4)[:, None] * np.array([2.0, 1.0])
        xy = [tuple(p) for p in steps.tolist()]
        ours, pillows = Image.new("L", (112, 112)), Image.new("L", (112, 112))
        round_joint_line(ImageDraw.Draw(ours), xy, width)
        ImageDraw.Draw(pillows).line(xy, fill=255, width=width, joint="curve")
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(pillows))


def test_chain_polylines_samples_each_cubic_segment_and_keeps_short_chains() -> None:
    """Two chains: one of two cubic segments (7 points), one lone point; hand-computed ends and
    midpoints of the Bézier curves."""
    points = np.array(
        [[0, 0], [0, 3], [3, 3], [3, 0], [6, 0], [6, 6], [9, 6], [5, 5]], dtype=np.float64
    )
    first, second = chain_polylines(points, (7, 1), samples=3)
    assert len(first) == 6 and second == [(5.0, 5.0)]
    assert first[0] == (0.0, 0.0) and first[2] == (3.0, 0.0) and first[5] == (9.0, 6.0)
    assert first[1] == pytest.approx((1.5, 2.25))  # (P0 + 3 P1 + 3 P2 + P3) / 8
    assert first[4] == pytest.approx((6.0, 3.0))


# --- the handwriting style ---------------------------------------------------------------------


def test_handwriting_style_is_deterministic_white_on_black_and_varied() -> None:
    lib = by_codepoint()
    config = HandwritingConfig()
    go = lib[ord("語")]
    a = config.draw(go, sample_rng(0, go.codepoint, 3))
    assert a.shape == (28, 28) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, config.draw(go, sample_rng(0, go.codepoint, 3)))
    assert a.max() > 200 and a[0, 0] == 0
    images = render_samples([lib[ord(c)] for c in "木口語"], 8, config, progress=False)
    assert images.shape == (24, 1, 28, 28)
    ink = (images > 127).mean(axis=(1, 2, 3)).reshape(3, 8)  # [character, drawing]
    assert ink.min() > 0.01  # no drawing vanishes under blur and thresholding
    # the ink of one character varies twice as much as in the classic drawings (0.047 vs 0.021):
    # pen widths, hands and scanners differ from drawing to drawing
    classic = render_samples([lib[ord(c)] for c in "木口語"], 8, RenderConfig(), progress=False)
    classic_ink = (classic > 127).mean(axis=(1, 2, 3)).reshape(3, 8)
    assert ink.std(1).mean() > 1.8 * classic_ink.std(1).mean()

    # edges range from sharp (a thick one-bit pen) to soft (a blurred or coarse scan): grey
    # pixels per ink pixel spread three times as widely as in the classic drawings
    def softness(drawings: np.ndarray) -> np.ndarray:
        grey = ((drawings > 30) & (drawings < 225)).mean(axis=(1, 2, 3))
        return grey / (drawings > 127).mean(axis=(1, 2, 3))

    assert softness(images).std() > 2 * softness(classic).std()


def test_handwriting_style_draws_each_step() -> None:
    """Each randomisation switched on alone changes the drawing; all off gives a clean pen line."""
    one = by_codepoint()[ord("口")]
    off = HandwritingConfig(
        pressure=0, taper=0, point_jitter=0, wobble=0, drift=0, end_jitter=0, ligature=0,
        stroke_dropout=0, rotation=0, scale=(1, 1), aspect=0, shear=0, translation=0, elastic=0,
        blur=(0, 0), threshold=(0.5, 0.5), low_resolution=0, pen_width=(6, 6), spacing=(3, 3),
    )  # fmt: skip
    base = off.draw(one, sample_rng(0, one.codepoint, 0))
    assert base.max() == 255
    for change in (
        {"pressure": 0.4}, {"wobble": 2.0}, {"elastic": 5.0}, {"rotation": 12.0},
        {"blur": (1.0, 1.0), "threshold": (0.6, 0.6)}, {"low_resolution": 0.999},
        {"pen_width": (10, 10)},
    ):  # fmt: skip
        drawn = replace(off, **change).draw(one, sample_rng(0, one.codepoint, 0))
        assert not np.array_equal(drawn, base), change
    dropped = replace(off, stroke_dropout=0.999).draw(one, sample_rng(0, one.codepoint, 0))
    assert 0 < (dropped > 127).sum() < (base > 127).sum()  # one of the three strokes is left out


def test_handwriting_config_is_checked_and_keyed() -> None:
    with pytest.raises(ValueError, match="pen_width must be"):
        HandwritingConfig(pen_width=(5, 2))
    with pytest.raises(ValueError, match="stroke_dropout is a probability"):
        HandwritingConfig(stroke_dropout=1.5)
    keyed = HandwritingConfig().as_dict()
    assert keyed["style"] == "handwriting" and keyed["style_version"] == HANDWRITING_VERSION
    assert "style" not in RenderConfig().as_dict()


def test_mixed_style_draws_each_drawing_in_one_of_the_two_styles() -> None:
    kanji = by_codepoint()[0x6C34]  # 水
    mixed, classic, handwriting = MixedConfig(), RenderConfig(), HandwritingConfig()
    chosen = []
    for seed in range(12):
        coin = np.random.default_rng(seed)
        style = handwriting if coin.random() < 0.5 else classic
        expected = style.draw(kanji, coin)  # the coin, then that style from the same stream
        drawn = mixed.draw(kanji, np.random.default_rng(seed))
        assert np.array_equal(drawn, expected) and drawn.shape == (28, 28)
        chosen.append(style is handwriting)
    assert 0 < sum(chosen) < len(chosen)  # both styles occur
    keyed = MixedConfig(handwriting_share=0.25).as_dict()
    assert (keyed["style"], keyed["handwriting_share"]) == ("mixed", 0.25)
    assert keyed["classic"] == classic.as_dict() and keyed["handwriting"] == handwriting.as_dict()
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="handwriting_share is a probability in \\(0, 1\\)"):
            MixedConfig(handwriting_share=share)
    module = KanjiDataModule(render_style="mixed", **SMALL)
    assert module.cache_path.name.startswith("kanjivg-v1-mixed-28px-6x-")


def test_render_style_has_its_own_cache_and_the_same_classes(
    tmp_path: Path, cache_dir: Path
) -> None:
    classic = KanjiDataModule(cache_dir=str(cache_dir), **SMALL)
    styled = KanjiDataModule(cache_dir=str(tmp_path), render_style="handwriting", **SMALL)
    assert styled.cache_path.name.startswith("kanjivg-v1-handwriting-28px-6x-")
    assert styled.cache_path.name.split("-")[-1] != classic.cache_path.name.split("-")[-1]
    assert styled.cache_params["render"]["style"] == "handwriting"
    classic.setup()
    styled.setup()
    for split in ("train", "val", "test"):
        assert styled.splits[split].class_names == classic.splits[split].class_names
        assert styled.splits[split].groups == classic.splits[split].groups
    assert not torch.equal(styled.splits["train"].images, classic.splits["train"].images)
    with pytest.raises(ValueError, match="render_style must be one of"):
        KanjiDataModule(render_style="brush")
    with pytest.raises(ValueError, match="render_processes must be at least 1"):
        KanjiDataModule(render_processes=0)


# --- the DataModule ------------------------------------------------------------------------------


def test_splits_are_disjoint_by_class_and_radical(cache_dir: Path) -> None:
    dm = KanjiDataModule(cache_dir=str(cache_dir), **SMALL)
    dm.setup()
    lib = by_codepoint()
    seen_classes: set[str] = set()
    seen_groups: set[str] = set()
    total = 0
    for split, ds in dm.splits.items():
        assert ds.images.shape[1:] == (1, 28, 28), split
        assert len(ds) == ds.num_classes * 6
        assert seen_classes.isdisjoint(ds.class_names)
        assert seen_groups.isdisjoint(ds.groups)
        seen_classes |= set(ds.class_names)
        seen_groups |= set(ds.groups)
        total += ds.num_classes
        members = sorted(c for group in ds.groups.values() for c in group)
        assert members == list(range(ds.num_classes))  # every class in exactly one group
        for radical, classes in ds.groups.items():
            for c in classes:
                name = ds.class_names[c]
                assert name.startswith("kanji:U+")
                assert lib[int(name.removeprefix("kanji:U+"), 16)].radical == radical
    assert total == 36 and len(seen_groups) == 6
    assert [len(dm.splits[s].groups) for s in ("train", "val", "test")] == [4, 1, 1]


def test_radical_grouping_draws_each_task_from_one_radical(cache_dir: Path) -> None:
    dm = KanjiDataModule(cache_dir=str(cache_dir), grouping="radical", **SMALL)
    dm.setup()
    groups = dm.splits["train"].groups
    group_of = {c: g for g, members in groups.items() for c in members}
    tasks = 0
    for episode in dm.train_dataloader():
        assert episode.support_x.shape == (4, 3, 1, 28, 28)
        for row in episode.classes.tolist():
            assert len({group_of[c] for c in row}) == 1
            tasks += 1
    assert tasks == 12
    drawn = {group_of[c] for ep in dm.train_dataloader() for c in ep.classes.flatten().tolist()}
    assert len(drawn) > 1  # tasks come from several radicals, each task from one


def test_seed_changes_the_split_but_reuses_the_cache(cache_dir: Path) -> None:
    a = KanjiDataModule(cache_dir=str(cache_dir), seed=0, **SMALL)
    b = KanjiDataModule(cache_dir=str(cache_dir), seed=1, **SMALL)
    assert a.cache_path == b.cache_path
    a.setup()
    b.setup()
    assert set(a.splits["train"].groups) != set(b.splits["train"].groups)


def test_cache_is_reused_without_rendering(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = KanjiDataModule(cache_dir=str(cache_dir), **SMALL).cache_path
    assert path.is_file() and path.name.startswith("kanjivg-v1-28px-6x-")
    mtime = path.stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a valid cache must not be rendered again")

    monkeypatch.setattr(kanji_module, "render_samples", fail)
    for _ in range(2):
        dm = KanjiDataModule(cache_dir=str(cache_dir), **SMALL)
        dm.prepare_data()
        dm.setup()
    assert path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in cache_dir.iterdir() if p.suffix == ".tmp") == []


def test_a_process_reads_the_cache_file_once_until_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file written is a plain ``.npz`` (``np.load`` reads it); the arrays of the file read
    or written last are kept, so later data modules of the process do not open it again, while
    a new file at the same path (another process rendered it) is read."""
    dm = KanjiDataModule(cache_dir=str(tmp_path), **SMALL)
    rendered = dm.load_or_render()
    with np.load(dm.cache_path) as archive:
        np.testing.assert_array_equal(archive["images"], rendered["images"])
        assert json.loads(str(archive["header"]))["params"] == dm.cache_params
    loads = []
    real_load = np.load
    monkeypatch.setattr(
        kanji_module.np, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k)
    )
    again = KanjiDataModule(cache_dir=str(tmp_path), **SMALL).load_or_render()
    assert loads == [] and again.keys() == rendered.keys()
    np.testing.assert_array_equal(again["images"], rendered["images"])
    again.pop("images")  # the caller's dict is its own
    assert "images" in KanjiDataModule(cache_dir=str(tmp_path), **SMALL).load_or_render()
    os.utime(dm.cache_path, ns=(0, dm.cache_path.stat().st_mtime_ns + 10**9))
    reread = KanjiDataModule(cache_dir=str(tmp_path), **SMALL).load_or_render()
    assert len(loads) == 1
    np.testing.assert_array_equal(reread["labels"], rendered["labels"])


def test_cache_name_encodes_render_parameters(tmp_path: Path) -> None:
    base = KanjiDataModule(cache_dir=str(tmp_path), **SMALL).cache_path
    names = {
        base,
        KanjiDataModule(cache_dir=str(tmp_path), **{**SMALL, "samples_per_class": 7}).cache_path,
        KanjiDataModule(cache_dir=str(tmp_path), **{**SMALL, "max_classes": 30}).cache_path,
        KanjiDataModule(cache_dir=str(tmp_path), image_size=20, **SMALL).cache_path,
    }
    assert len(names) == 4 and all(p.parent == tmp_path for p in names)


def test_image_size_is_rendered(tmp_path: Path) -> None:
    dm = KanjiDataModule(cache_dir=str(tmp_path), image_size=20, **SMALL)
    dm.setup()
    assert dm.splits["val"].images.shape[1:] == (1, 20, 20)
    assert next(iter(dm.val_dataloader())).query_x.shape[-2:] == (20, 20)


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "stale_checksum"])
def test_corrupt_cache_is_detected_and_rendered_again(
    cache_dir: Path, tmp_path: Path, damage: str
) -> None:
    good = KanjiDataModule(cache_dir=str(cache_dir), **SMALL).cache_path
    dm = KanjiDataModule(cache_dir=str(tmp_path), **SMALL)
    path = dm.cache_path
    shutil.copy(good, path)
    blob = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(blob[: len(blob) // 2])
    elif damage == "flip_bytes":
        middle = len(blob) // 2
        path.write_bytes(blob[:middle] + bytes(b ^ 0xFF for b in blob[middle : middle + 64]))
    else:  # a readable archive whose images do not match its checksum
        with np.load(good) as archive:
            arrays = dict(archive)
        arrays["images"] = arrays["images"].copy()
        arrays["images"][0, 0, 0, 0] ^= 1
        np.savez(path, **arrays)
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        dm.setup()
    with np.load(path) as fresh, np.load(good) as reference:
        np.testing.assert_array_equal(fresh["images"], reference["images"])
    assert dm.splits["train"].num_classes == 24


def test_concurrent_renders_render_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = kanji_module.render_samples

    def slow_render(*args, **kwargs):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # widen the race window: the other thread must wait on the lock
        return original(*args, **kwargs)

    monkeypatch.setattr(kanji_module, "render_samples", slow_render)
    results: list[dict] = []
    params = {**SMALL, "max_classes": 18, "max_classes_per_group": 3}
    threads = [
        threading.Thread(
            target=lambda: results.append(
                KanjiDataModule(cache_dir=str(tmp_path), **params).load_or_render()
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2
    np.testing.assert_array_equal(results[0]["images"], results[1]["images"])
    assert [p.suffix for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


# Run by two independent interpreters at once: two nodes of a job preparing their data into one
# shared folder (Lightning calls prepare_data on local rank 0 of every node), no launcher between
# them. Each waits at a start line, then reports whether the cache was there, how often it rendered
# and the checksum of the arrays it loaded.
SHARED_CACHE_NODE = """
import json, sys, time
from pathlib import Path
from lightning_metakd.data import KanjiDataModule
from lightning_metakd.data import kanji

cache_dir, start, me, params = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
renders = []
render_samples = kanji.render_samples
kanji.render_samples = lambda *args, **kwargs: renders.append(me) or render_samples(*args, **kwargs)
dm = KanjiDataModule(cache_dir=str(cache_dir), **params)
(start / me).touch()
deadline = time.monotonic() + 60
while len(list(start.iterdir())) < 2 and time.monotonic() < deadline:
    time.sleep(0.005)
existed = dm.cache_path.exists()
dm.prepare_data()
data = dm.load_or_render()
print(json.dumps({"existed": existed, "renders": len(renders), "checksum": kanji._checksum(data)}))
"""


@pytest.mark.slow
def test_two_processes_sharing_a_cache_folder_render_it_once_and_read_the_same_arrays(
    tmp_path: Path,
) -> None:
    """Across processes the render is serialised by the cache's ``flock``: the first renders, the
    second waits and reads that file; the folder holds one whole cache file (and its lock file)."""
    cache, start = tmp_path / "cache", tmp_path / "start"
    start.mkdir()
    params = {**SMALL, "max_classes": 12, "max_classes_per_group": 4, "samples_per_class": 4}
    nodes = run_together(
        [
            [
                sys.executable,
                "-c",
                SHARED_CACHE_NODE,
                str(cache),
                str(start),
                str(node),
                json.dumps(params),
            ]
            for node in range(2)
        ],
        [os.environ] * 2,
        timeout=120,
    )
    assert [proc.returncode for proc in nodes] == [0, 0], [proc.stdout[-2000:] for proc in nodes]
    reports = [json.loads(proc.stdout.strip().splitlines()[-1]) for proc in nodes]
    assert [r["existed"] for r in reports] == [False, False]  # they really raced
    assert sorted(r["renders"] for r in reports) == [0, 1]
    assert reports[0]["checksum"] == reports[1]["checksum"]
    path = KanjiDataModule(cache_dir=str(cache), **params).cache_path
    assert sorted(p.name for p in cache.iterdir()) == [path.name, path.name + ".lock"]
    on_disk = kanji_module._read_cache(path)
    assert on_disk is not None and kanji_module._checksum(on_disk) == reports[0]["checksum"]
    assert len(on_disk["images"]) == 12 * 4


def test_too_many_ways_for_a_split_is_a_clear_error(cache_dir: Path) -> None:
    dm = KanjiDataModule(cache_dir=str(cache_dir), **{**SMALL, "ways": 10})
    with pytest.raises(ValueError, match="needs 10 ways but the val split has only 6 classes"):
        dm.setup()
    dm = KanjiDataModule(cache_dir=str(cache_dir), grouping="radical", **{**SMALL, "ways": 7})
    with pytest.raises(ValueError, match="No group in the train split has 7 classes"):
        dm.setup()


def test_bad_arguments_are_rejected(cache_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split_fractions"):
        KanjiDataModule(split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="with train > 0"):
        KanjiDataModule(split_fractions=(0.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="samples_per_class must be at least 1"):
        KanjiDataModule(samples_per_class=0)
    with pytest.raises(ValueError, match="grouping must be 'none' or 'radical'"):
        KanjiDataModule(grouping="alphabet")
    too_few = KanjiDataModule(cache_dir=str(tmp_path), **{**SMALL, "max_classes": 12})
    with pytest.raises(ValueError, match="2 radical group"):
        too_few.setup()


def test_zero_split_fractions_leave_out_val_and_test(cache_dir: Path) -> None:
    dm = KanjiDataModule(cache_dir=str(cache_dir), split_fractions=(1, 0, 0), **SMALL)
    dm.setup("fit")
    assert set(dm.splits) == {"train"}
    assert dm.splits["train"].num_classes == 36 and len(dm.splits["train"].groups) == 6
    assert dm.val_dataloader() == []
    held_out = KanjiDataModule(cache_dir=str(cache_dir), split_fractions=(0.5, 0, 0.5), **SMALL)
    held_out.setup()
    assert {s: len(ds.groups) for s, ds in held_out.splits.items()} == {"train": 3, "test": 3}


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "lightning_metakd"
    assert KanjiDataModule().cache_path.parent == tmp_path / "lightning_metakd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "lightning_metakd"
