"""Data modules for data sets users bring (Folder, Omniglot, mini-ImageNet), on tiny fake trees."""

from __future__ import annotations

import io
import itertools
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lightning_metakd.data import (
    EpisodicDataModule,
    FolderDataModule,
    MiniImageNetDataModule,
    NumpyOnlyUnpickler,
    OmniglotDataModule,
)
from lightning_metakd.data.folder import seeded_split
from lightning_metakd.data.miniimagenet import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Normalize,
    RandomCropFlip,
    UnsafePickleError,
)
from lightning_metakd.data.omniglot import vinyals_split

SMALL = {"ways": 2, "shots": 1, "queries": 1, "meta_batch_size": 2, "steps_per_epoch": 2}
SMALL_EVAL = {"val_episodes": 2, "test_episodes": 2}

# Omniglot's evaluation alphabets and their character counts (659 in all).
EVALUATION_ALPHABETS = {
    "Angelic": 20, "Atemayar_Qelisayer": 26, "Atlantean": 26, "Aurek-Besh": 26, "Avesta": 26,
    "Ge_ez": 26, "Glagolitic": 45, "Gurmukhi": 45, "Kannada": 41, "Keble": 26, "Malayalam": 47,
    "Manipuri": 40, "Mongolian": 30, "Old_Church_Slavonic_(Cyrillic)": 45, "Oriya": 46,
    "Sylheti": 28, "Syriac_(Serto)": 23, "Tengwar": 25, "Tibetan": 42, "ULOG": 26,
}  # fmt: skip


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def stroke_png(size: int = 20, mark: int = 0) -> bytes:
    """Omniglot-like: a black vertical bar (the stroke) on white, 1-bit PNG.

    ``mark``'s bits, as black pixels in the last row, make drawings that differ byte for byte.
    """
    image = Image.new("L", (size, size), 255)
    ImageDraw.Draw(image).rectangle([size // 2 - 2, 2, size // 2 + 1, size - 3], fill=0)
    for bit in range(size):
        if mark >> bit & 1:
            image.putpixel((bit, size - 1), 0)
    return encode(image.convert("1"))


def colour_image(value: int, size: int = 20, fmt: str = "PNG") -> bytes:
    return encode(Image.new("RGB", (size, size), (value, 255 - value, 128)), fmt)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_class_tree(root: Path, classes: list[str], per_class: int = 3, ext: str = "png") -> None:
    """``<root>/<class>/NN.<ext>`` with a colour that encodes the class."""
    for c, name in enumerate(classes):
        data = colour_image(20 * c % 256, fmt="JPEG" if ext == "jpg" else "PNG")
        for i in range(per_class):
            write(root / name / f"{i:02d}.{ext}", data)


def make_alphabets(
    root: Path, alphabets: dict[str, int], per_character: int = 3, distinct: bool = False
) -> None:
    """``<root>/<Alphabet>/characterNN/<id>_NN.png`` like Omniglot's zips.

    Every file has the same bytes, unless ``distinct``: then each (alphabet, character, drawer)
    gets its own drawing (a mark in the last row encodes it), as in the real data set.
    """
    data, marks = stroke_png(), itertools.count(1)
    for a, (alphabet, characters) in enumerate(alphabets.items()):
        for c in range(1, characters + 1):
            for d in range(1, per_character + 1):
                if distinct:
                    data = stroke_png(mark=next(marks))
                write(root / alphabet / f"character{c:02d}" / f"{a:02d}{c:02d}_{d:02d}.png", data)


def alphabet_of(name: str) -> str:
    return name.removeprefix("omniglot:").split("/")[0]


def split_names(dm: EpisodicDataModule) -> dict[str, set[str]]:
    return {s: set(dm.splits[s].base_class_names) for s in ("train", "val", "test")}


def assert_disjoint(names: dict[str, set[str]]) -> None:
    assert not names["train"] & names["val"]
    assert not names["train"] & names["test"]
    assert not names["val"] & names["test"]


# --- FolderDataModule


def test_folder_flat_tree_seeded_class_split(tmp_path):
    classes = [f"class{i:02d}" for i in range(20)]
    make_class_tree(tmp_path, classes)
    (tmp_path / "class00" / "notes.txt").write_text("not an image")
    write(tmp_path / "class00" / ".hidden.png", b"junk")
    dm = FolderDataModule(tmp_path, image_size=16, **SMALL, **SMALL_EVAL)
    dm.setup()
    names = split_names(dm)
    assert [len(names[s]) for s in ("train", "val", "test")] == [14, 2, 4]
    assert_disjoint(names)
    assert set().union(*names.values()) == set(classes)
    # Files are sorted and filtered by extension; the split is seeded.
    train = dm.splits["train"]
    first = train.base_class_names[0]
    assert [
        Path(p).name for p, y in zip(train.images, train.base_labels, strict=True) if y == 0
    ] == [
        "00.png",
        "01.png",
        "02.png",
    ]
    assert all(Path(p).parent.name == first for p in train.images[:3])
    again = FolderDataModule(tmp_path, image_size=16, **SMALL, **SMALL_EVAL)
    again.setup()
    assert split_names(again) == names
    other = FolderDataModule(tmp_path, image_size=16, seed=1, **SMALL, **SMALL_EVAL)
    other.setup()
    assert split_names(other) != names

    episode = next(iter(dm.train_dataloader()))
    assert episode.support_x.shape == (2, 2, 3, 16, 16)
    assert episode.query_x.shape == (2, 2, 3, 16, 16)
    assert dm.channels == 3


def test_folder_channels_one_gives_grey_images(tmp_path):
    make_class_tree(tmp_path, [f"c{i}" for i in range(20)], ext="jpg")
    dm = FolderDataModule(tmp_path, channels=1, image_size=8, **SMALL, **SMALL_EVAL)
    dm.setup()
    episode = next(iter(dm.val_dataloader()))
    assert episode.support_x.shape[2:] == (1, 8, 8)
    assert dm.channels == 1


def test_folder_split_subfolders_are_used_as_given(tmp_path):
    make_class_tree(tmp_path / "train", ["a", "b", "c"])
    make_class_tree(tmp_path / "validation", ["d", "e"])
    make_class_tree(tmp_path / "test", ["f", "g"])
    dm = FolderDataModule(tmp_path, image_size=8, **SMALL, **SMALL_EVAL)
    dm.setup()
    assert split_names(dm) == {"train": {"a", "b", "c"}, "val": {"d", "e"}, "test": {"f", "g"}}


def test_folder_class_in_two_split_folders_is_reported(tmp_path):
    make_class_tree(tmp_path / "train", ["a", "b"])
    make_class_tree(tmp_path / "val", ["b", "c"])
    make_class_tree(tmp_path / "test", ["d", "e"])
    with pytest.raises(ValueError, match="share 1 class"):
        FolderDataModule(tmp_path, image_size=8, **SMALL, **SMALL_EVAL).setup()


def test_folder_missing_split_folder_is_named(tmp_path):
    make_class_tree(tmp_path / "train", ["a", "b"])
    make_class_tree(tmp_path / "test", ["c", "d"])
    with pytest.raises(FileNotFoundError, match=r"no val/ or valid/ or validation/"):
        FolderDataModule(tmp_path, **SMALL).setup()


def test_folder_root_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        FolderDataModule(tmp_path / "nowhere", **SMALL).setup()
    assert "<class A>/" in str(err.value)  # the expected tree is shown


def test_folder_root_that_is_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        FolderDataModule(tmp_path / "file.txt", **SMALL).setup()


def test_folder_images_without_class_folders(tmp_path):
    for i in range(3):
        write(tmp_path / f"{i}.png", colour_image(i))
    with pytest.raises(FileNotFoundError) as err:
        FolderDataModule(tmp_path, **SMALL).setup()
    message = str(err.value)
    assert "found 3 entries: 0.png, 1.png, 2.png" in message
    assert "own sub-folder" in message and "train/<class>/*.png" in message


def test_folder_empty_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="found an empty folder"):
        FolderDataModule(tmp_path, **SMALL).setup()


def test_folder_image_damaged_after_setup_names_the_file_when_read(tmp_path):
    """Setup checks every file (tests/test_image_files.py); a file damaged later is still named."""
    make_class_tree(tmp_path / "train", ["a", "b"])
    make_class_tree(tmp_path / "val", ["c", "d"])
    make_class_tree(tmp_path / "test", ["e", "f"])
    dm = FolderDataModule(tmp_path, image_size=8, **SMALL, **SMALL_EVAL)
    dm.setup()
    for name in ("00.png", "01.png", "02.png"):
        path = tmp_path / "train" / "a" / name
        path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(OSError, match=r"Cannot read image file .*train/a/0\d\.png"):
        next(iter(dm.train_dataloader()))


def test_folder_class_with_too_few_images(tmp_path):
    make_class_tree(tmp_path / "train", ["a", "b"], per_class=3)
    make_class_tree(tmp_path / "val", ["c", "d"], per_class=3)
    make_class_tree(tmp_path / "test", ["e", "f"], per_class=3)
    (tmp_path / "test" / "f" / "02.png").unlink()
    dm = FolderDataModule(tmp_path, ways=2, shots=1, queries=2, **SMALL_EVAL)
    with pytest.raises(
        ValueError, match=r"Class 'f' of the test split has 2 images.*shots \+ queries = 1 \+ 2 = 3"
    ):
        dm.setup()


def test_seeded_split_sizes_and_errors():
    train, val, test = seeded_split(list(range(10)), (0.7, 0.1, 0.2), seed=3)
    assert (len(train), len(val), len(test)) == (7, 1, 2)
    assert sorted(train + val + test) == list(range(10))
    assert train == sorted(train)  # each part keeps the input order
    with pytest.raises(ValueError, match="at least 3"):
        seeded_split([1, 2], (0.7, 0.1, 0.2), seed=0)
    with pytest.raises(ValueError, match="sum to 1"):
        seeded_split(list(range(10)), (0.7, 0.2, 0.2), seed=0)


# --- OmniglotDataModule

ALPHABETS = {"Alpha": 4, "Beta": 3, "Gamma": 4}
EVAL_ALPHABETS = {"Delta": 3, "Epsilon": 4}


@pytest.fixture
def omniglot_root(tmp_path) -> Path:
    make_alphabets(tmp_path / "images_background", ALPHABETS)
    make_alphabets(tmp_path / "images_evaluation", EVAL_ALPHABETS)
    return tmp_path


@pytest.mark.parametrize("layout", ["official", "torchvision", "alphabets"])
def test_omniglot_layouts_give_the_same_alphabet_split(tmp_path, layout):
    if layout == "official":
        make_alphabets(tmp_path / "images_background", ALPHABETS)
        make_alphabets(tmp_path / "images_evaluation", EVAL_ALPHABETS)
    elif layout == "torchvision":
        make_alphabets(tmp_path / "omniglot-py" / "images_background", ALPHABETS)
        make_alphabets(tmp_path / "omniglot-py" / "images_evaluation", EVAL_ALPHABETS)
    else:
        make_alphabets(tmp_path, ALPHABETS | EVAL_ALPHABETS)
    dm = OmniglotDataModule(tmp_path, **SMALL, **SMALL_EVAL)
    dm.setup()
    assert dm.split_used == "alphabet"
    names = split_names(dm)
    assert_disjoint(names)
    assert sum(len(n) for n in names.values()) == 18
    alphabets = {s: {alphabet_of(n) for n in names[s]} for s in names}
    # Whole alphabets: 5 alphabets -> 3 / 1 / 1, never shared between splits.
    assert [len(alphabets[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    assert set().union(*alphabets.values()) == set(ALPHABETS) | set(EVAL_ALPHABETS)
    assert all(n.startswith("omniglot:") for n in names["train"])
    for split in ("train", "val", "test"):
        ds = dm.splits[split]
        assert set(ds.groups) == alphabets[split]
        for alphabet, members in ds.groups.items():
            assert {alphabet_of(ds.class_names[c]) for c in members} == {alphabet}
    episode = next(iter(dm.train_dataloader()))
    assert episode.support_x.shape == (2, 2, 1, 28, 28)


def test_omniglot_images_are_inverted_white_strokes(omniglot_root):
    dm = OmniglotDataModule(omniglot_root, **SMALL, **SMALL_EVAL)
    dm.setup()
    image = dm.splits["train"].load_image(0)
    assert image.shape == (1, 28, 28)
    stroke, background = image[0, 6:22, 13:15], image[0, :, :5]
    assert stroke.min() > 0.9  # the black stroke of the file is bright after loading
    assert background.max() < 0.05


def test_omniglot_alphabet_grouping_keeps_each_task_in_one_alphabet(omniglot_root):
    dm = OmniglotDataModule(
        omniglot_root,
        grouping="alphabet",
        ways=3,
        shots=1,
        queries=1,
        meta_batch_size=8,
        steps_per_epoch=4,
        **SMALL_EVAL,
    )
    dm.setup()
    train = dm.splits["train"]
    seen = set()
    for episode in dm.train_dataloader():
        for task in episode.classes.tolist():
            alphabets = {alphabet_of(train.class_names[c]) for c in task}
            assert len(alphabets) == 1
            seen |= alphabets
    assert len(seen) > 1


def test_omniglot_rotations_multiply_training_classes(omniglot_root):
    dm = OmniglotDataModule(omniglot_root, split="character", rotations=True, **SMALL, **SMALL_EVAL)
    dm.setup()
    train = dm.splits["train"]
    assert train.num_classes == 4 * len(train.base_class_names)
    assert sum(len(m) for m in train.groups.values()) == train.num_classes


def test_omniglot_character_split_is_seeded(omniglot_root):
    a = OmniglotDataModule(omniglot_root, split="character", **SMALL, **SMALL_EVAL)
    b = OmniglotDataModule(omniglot_root, split="character", **SMALL, **SMALL_EVAL)
    a.setup()
    b.setup()
    assert split_names(a) == split_names(b)
    assert [len(n) for n in split_names(a).values()] == [
        12,
        2,
        4,
    ]  # 18 characters: round(3.6), round(1.8)


def _characters(alphabets: dict[str, int]) -> list[tuple[str, str, list[Path]]]:
    return [(a, f"character{c:02d}", []) for a, n in alphabets.items() for c in range(1, n + 1)]


def full_background_alphabets() -> dict[str, int]:
    counts = {f"Background{i:02d}": 32 for i in range(30)}
    counts["Background29"] = 964 - 29 * 32
    return counts


def test_vinyals_split_rule():
    background = _characters(full_background_alphabets())
    evaluation = _characters(EVALUATION_ALPHABETS)
    train, val, test = vinyals_split(
        background[::-1], evaluation[::-1]
    )  # input order is irrelevant
    assert (len(train), len(val), len(test)) == (1100, 100, 423)
    assert {c[0] for c in train} >= {c[0] for c in background}
    assert [f"{a}/{c}" for a, c, _ in test[:5]] == [
        "Gurmukhi/character42",
        "Gurmukhi/character43",
        "Gurmukhi/character44",
        "Gurmukhi/character45",
        "Kannada/character01",
    ]
    assert f"{val[0][0]}/{val[0][1]}" == "Ge_ez/character13"
    assert f"{val[-1][0]}/{val[-1][1]}" == "Gurmukhi/character41"
    assert {c[0] for c in test} == {"Gurmukhi"} | set(list(EVALUATION_ALPHABETS)[8:])


def test_omniglot_full_tree_uses_vinyals_split(tmp_path):
    make_alphabets(tmp_path / "images_background", full_background_alphabets(), per_character=2)
    make_alphabets(tmp_path / "images_evaluation", EVALUATION_ALPHABETS, per_character=2)
    dm = OmniglotDataModule(tmp_path, **SMALL, **SMALL_EVAL)
    dm.setup()
    assert dm.split_used == "vinyals"
    names = split_names(dm)
    assert [len(names[s]) for s in ("train", "val", "test")] == [1100, 100, 423]
    assert "omniglot:Gurmukhi/character42" in names["test"]
    assert "omniglot:Gurmukhi/character41" in names["val"]


def test_omniglot_vinyals_needs_the_full_data_set(omniglot_root):
    with pytest.raises(ValueError, match=r"needs the full Omniglot .* holds 11 \+ 7"):
        OmniglotDataModule(omniglot_root, split="vinyals", **SMALL).setup()


def test_omniglot_wrong_layouts(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OmniglotDataModule(tmp_path / "missing", **SMALL).setup()
    make_class_tree(tmp_path / "flat", ["a", "b", "c"])
    with pytest.raises(FileNotFoundError, match="use FolderDataModule") as err:
        OmniglotDataModule(tmp_path / "flat", **SMALL).setup()
    assert "images_background/<Alphabet>/characterNN/*.png" in str(err.value)
    (tmp_path / "empty" / "images_background").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="images_background/ is there but holds no"):
        OmniglotDataModule(tmp_path / "empty", **SMALL).setup()


def test_omniglot_small_background_sets_side_by_side(tmp_path):
    """Lake et al.'s images_background_small1/ and _small2/ share alphabets, byte for byte."""
    small1, small2 = tmp_path / "images_background_small1", tmp_path / "images_background_small2"
    make_alphabets(small1, {"Alpha": 4, "Beta": 3}, distinct=True)
    make_alphabets(small2, {"Alpha": 4, "Beta": 3}, distinct=True)  # the same bytes again
    make_alphabets(small2, {"Gamma": 4}, distinct=True)
    with pytest.warns(UserWarning) as record:
        dm = OmniglotDataModule(
            tmp_path, split="character", split_fractions=(0.6, 0.2, 0.2), **SMALL, **SMALL_EVAL
        )
        dm.setup()
    assert [str(w.message) for w in record] == [
        f"OmniglotDataModule: 7 character(s) appear in more than one folder, e.g. Alpha/character01 "
        f"in {small1} and {small2}; each is kept once, and 21 byte-identical copies of their "
        "images were dropped. Pass one copy of each set to silence this."
    ]
    train = dm.splits["train"]
    names = split_names(dm)
    assert sum(len(n) for n in names.values()) == 11
    alpha = train.class_names.index("omniglot:Alpha/character01")
    assert [Path(train.images[i]).parent.parent.parent for i in train.indices_by_class[alpha]] == [
        small1
    ] * 3


def test_omniglot_several_roots_are_read_together(tmp_path):
    make_alphabets(tmp_path / "a", {"Alpha": 4, "Beta": 3}, distinct=True)
    make_alphabets(tmp_path / "b" / "images_evaluation", {"Delta": 3, "Epsilon": 4})
    make_alphabets(tmp_path / "c", {"Alpha": 4}, distinct=True)  # a copy of a/Alpha
    drawing = tmp_path / "c" / "Alpha" / "character01" / "0001_09.png"
    write(drawing, stroke_png(mark=999))  # a drawer that only this copy has
    roots = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    with pytest.warns(UserWarning, match="4 character\\(s\\) appear in more than one folder"):
        dm = OmniglotDataModule(
            roots, split="character", split_fractions=(0.6, 0.2, 0.2), **SMALL, **SMALL_EVAL
        )
        dm.setup()
    assert dm.root == roots and dm.roots == roots
    assert sum(len(n) for n in split_names(dm).values()) == 14
    everything = [p for ds in dm.splits.values() for p in ds.images]
    assert drawing in everything and len(everything) == 14 * 3 + 1
    assert (tmp_path / "c" / "Alpha" / "character01" / "0001_01.png") not in everything


def test_omniglot_roots_as_a_list_in_a_config(tmp_path):
    from jsonargparse import ArgumentParser

    make_alphabets(tmp_path / "a", {"Alpha": 4, "Beta": 3, "Gamma": 4})
    make_alphabets(tmp_path / "b", {"Delta": 3, "Epsilon": 4})
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(OmniglotDataModule, "data")
    config = {"data": {"root": [str(tmp_path / "a"), str(tmp_path / "b")], **SMALL, **SMALL_EVAL}}
    dm = parser.instantiate(parser.parse_object(config)).data
    dm.setup()
    assert sum(len(n) for n in split_names(dm).values()) == 18


def test_omniglot_small_sets_beside_the_full_set_still_give_the_vinyals_split(tmp_path):
    make_alphabets(tmp_path / "images_background", full_background_alphabets(), per_character=2)
    make_alphabets(tmp_path / "images_evaluation", EVALUATION_ALPHABETS, per_character=2)
    make_alphabets(tmp_path / "images_background_small1", {"Background00": 32}, per_character=2)
    with pytest.warns(UserWarning, match="32 character\\(s\\) appear in more than one folder"):
        dm = OmniglotDataModule(tmp_path, **SMALL, **SMALL_EVAL)
        dm.setup()
    assert dm.split_used == "vinyals"
    assert [dm.splits[s].num_classes for s in ("train", "val", "test")] == [1100, 100, 423]


def test_omniglot_one_alphabet_speaks_of_alphabets_and_characters(tmp_path):
    make_alphabets(tmp_path, {"Alpha": 2})
    with pytest.raises(ValueError) as err:
        OmniglotDataModule(tmp_path, split="alphabet", **SMALL).setup()
    assert str(err.value) == (
        "Cannot split 1 alphabet(s) into non-empty train/val/test parts with split_fractions="
        "(0.7, 0.1, 0.2): at least 3 are needed. Use split='character' to split the characters "
        "instead of whole alphabets, add alphabets, or set split_fractions to (1, 0, 0) to "
        "meta-train on every character without validation or test."
    )
    with pytest.raises(ValueError) as err:
        OmniglotDataModule(tmp_path, **SMALL).setup()  # auto: one alphabet -> characters
    assert str(err.value) == (
        "Cannot split 2 character(s) into non-empty train/val/test parts with split_fractions="
        "(0.7, 0.1, 0.2): at least 3 are needed. Add characters (Omniglot has 1,623 in 50 "
        "alphabets), or set split_fractions to (1, 0, 0) to meta-train on every character "
        "without validation or test."
    )


def test_omniglot_root_that_is_one_alphabet_says_to_point_above_it(tmp_path):
    make_alphabets(tmp_path, {"Alpha": 4})
    with pytest.raises(FileNotFoundError) as err:
        OmniglotDataModule(tmp_path / "Alpha", **SMALL).setup()
    message = str(err.value)
    assert message.startswith(
        f"OmniglotDataModule: {str(tmp_path / 'Alpha')!r} does not look like any supported layout "
        "(found 4 entries: character01/, character02/, character03/, character04/). Its "
        "sub-folders hold images directly, so it looks like a single alphabet "
        "(<character>/*.png): point root at the folder above it, which holds the alphabet folders "
        "(root/<alphabet>/<character>/*.png). For a plain class-per-folder tree use "
        "FolderDataModule. Expected one of:\n"
    )


def test_omniglot_empty_root_list(tmp_path):
    with pytest.raises(ValueError, match="root is an empty list"):
        OmniglotDataModule([])


def test_omniglot_bad_split_name(tmp_path):
    with pytest.raises(ValueError, match="split must be"):
        OmniglotDataModule(tmp_path, split="lake")


# --- mini-ImageNet


def cache(classes: dict[str, list[int]], values: dict[str, int], size: int = 12) -> dict:
    """A learn2learn-style cache whose pixel value encodes the class of each image."""
    n = sum(len(v) for v in classes.values())
    image_data = np.zeros((n, size, size, 3), dtype=np.uint8)
    for wnid, indices in classes.items():
        image_data[indices] = values[wnid]
    return {"image_data": image_data, "class_dict": classes}


def write_caches(root: Path, protocol: int = 4) -> None:
    splits = {
        "train": {"n01": [0, 2, 4], "n02": [1, 3, 5], "n03": [6, 7, 8]},  # interleaved indices
        "validation": {"n04": [0, 1, 2], "n05": [3, 4, 5]},
        "test": {"n06": [0, 1, 2], "n07": [3, 4, 5]},
    }
    values = {f"n0{i}": 30 * i for i in range(1, 8)}
    for split, classes in splits.items():
        data = pickle.dumps(cache(classes, values), protocol=protocol)
        write(root / f"mini-imagenet-cache-{split}.pkl", data)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_mini_imagenet_pickles(tmp_path, protocol):
    write_caches(tmp_path, protocol)
    dm = MiniImageNetDataModule(tmp_path, image_size=12, normalize=False, **SMALL, **SMALL_EVAL)
    dm.setup()
    assert dm.layout == "pickle"
    assert split_names(dm) == {
        "train": {"n01", "n02", "n03"},
        "val": {"n04", "n05"},
        "test": {"n06", "n07"},
    }
    train = dm.splits["train"]
    # Labels follow class_dict, not the storage order: each image shows its class's value.
    for index in range(len(train)):
        wnid = train.class_names[train.labels[index]]
        assert train.images[index].float().mean().item() == 30 * int(wnid[1:])
    episode = next(iter(dm.test_dataloader()))
    assert episode.support_x.shape == (2, 2, 3, 12, 12)
    for t in range(2):
        for j, c in enumerate(episode.classes[t].tolist()):
            value = 30 * int(dm.splits["test"].class_names[c][1:]) / 255
            assert torch.allclose(episode.support_x[t, j], torch.full((3, 12, 12), value))


def test_mini_imagenet_normalises_every_split(tmp_path):
    write_caches(tmp_path)
    dm = MiniImageNetDataModule(tmp_path, image_size=12, **SMALL, **SMALL_EVAL)
    dm.setup()
    episode = next(iter(dm.val_dataloader()))
    c = episode.classes[0, 0].item()
    value = 30 * int(dm.splits["val"].class_names[c][1:]) / 255
    expected = (value - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(episode.support_x[0, 0].mean((1, 2)), expected, atol=1e-5)
    assert isinstance(dm.splits["train"].transform, Normalize)
    assert isinstance(dm.splits["train"].transform.before, RandomCropFlip)
    assert dm.splits["train"].transform.before.padding == 1  # 8 at 84 px, scaled to 12 px


def test_mini_imagenet_transform_options(tmp_path):
    write_caches(tmp_path)
    plain = MiniImageNetDataModule(tmp_path, augment=False, normalize=False)
    assert plain.train_transform is None and plain.eval_transform is None
    default = MiniImageNetDataModule(tmp_path, normalize=False)
    assert isinstance(default.train_transform, RandomCropFlip)
    assert default.train_transform.padding == 8
    mine = MiniImageNetDataModule(tmp_path, train_transform=torch.flipud)
    assert mine.train_transform.before is torch.flipud


def test_random_crop_flip_is_a_shifted_window():
    torch.manual_seed(0)
    image = torch.arange(3 * 6 * 6, dtype=torch.float32).view(3, 6, 6) + 1
    assert torch.equal(RandomCropFlip(padding=0, flip_probability=1.0)(image), image.flip(-1))
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    windows = [padded[:, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
    windows += [w.flip(-1) for w in windows]
    outputs = [RandomCropFlip(padding=2)(image) for _ in range(40)]
    for out in outputs:
        assert out.shape == image.shape
        assert any(torch.equal(out, w) for w in windows)
    assert len({tuple(o.flatten().tolist()) for o in outputs}) > 5


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"image_data": _Exploit(marker), "class_dict": {}})
    with pytest.raises(UnsafePickleError, match=r"Refusing to load (posix|nt|os)\.system"):
        NumpyOnlyUnpickler(io.BytesIO(payload)).load()
    assert not marker.exists()
    legit = pickle.dumps(cache({"n01": [0, 1]}, {"n01": 7}))
    loaded = NumpyOnlyUnpickler(io.BytesIO(legit)).load()
    assert loaded["image_data"].shape == (2, 12, 12, 3) and loaded["class_dict"] == {"n01": [0, 1]}
    evil_builtin = pickle.dumps(eval)  # builtins.eval is not a container type
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        NumpyOnlyUnpickler(io.BytesIO(evil_builtin)).load()


def test_mini_imagenet_refuses_a_malicious_cache(tmp_path):
    write_caches(tmp_path)
    marker = tmp_path / "pwned"
    write(tmp_path / "mini-imagenet-cache-train.pkl", pickle.dumps(_Exploit(marker)))
    with pytest.raises(UnsafePickleError, match="mini-imagenet-cache-train.pkl"):
        MiniImageNetDataModule(tmp_path, **SMALL).setup()
    assert not marker.exists()


def test_mini_imagenet_damaged_caches(tmp_path):
    write_caches(tmp_path)
    write(tmp_path / "mini-imagenet-cache-test.pkl", pickle.dumps({"images": np.zeros(3)}))
    with pytest.raises(ValueError, match="'image_data' and 'class_dict'.*found \\['images'\\]"):
        MiniImageNetDataModule(tmp_path, **SMALL).setup()
    write(tmp_path / "mini-imagenet-cache-test.pkl", b"\x80\x04garbage")
    with pytest.raises(ValueError, match="damaged or not a learn2learn cache"):
        MiniImageNetDataModule(tmp_path, **SMALL).setup()
    bad = {"image_data": np.zeros((2, 12, 12, 3), np.uint8), "class_dict": {"n06": [0, 9]}}
    write(tmp_path / "mini-imagenet-cache-test.pkl", pickle.dumps(bad))
    with pytest.raises(ValueError, match="indices outside 0..1"):
        MiniImageNetDataModule(tmp_path, **SMALL).setup()
    (tmp_path / "mini-imagenet-cache-test.pkl").unlink()
    with pytest.raises(FileNotFoundError, match="not \\['mini-imagenet-cache-test.pkl'\\]"):
        MiniImageNetDataModule(tmp_path, **SMALL).setup()


def make_ravi_tree(root: Path) -> None:
    splits = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07"]}
    for split, wnids in splits.items():
        rows = ["filename,label"]
        for c, wnid in enumerate(wnids):
            data = colour_image(40 * c, fmt="JPEG")
            for i in range(3):
                name = f"{wnid}{i:08d}.jpg"
                write(root / "images" / name, data)
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


def test_mini_imagenet_ravi_csv_layout(tmp_path):
    make_ravi_tree(tmp_path)
    dm = MiniImageNetDataModule(tmp_path, image_size=16, **SMALL, **SMALL_EVAL)
    dm.setup()
    assert dm.layout == "csv"
    assert split_names(dm)["val"] == {"n04", "n05"}
    assert [Path(p).name for p in dm.splits["test"].images[:3]] == [
        "n0600000000.jpg",
        "n0600000001.jpg",
        "n0600000002.jpg",
    ]
    episode = next(iter(dm.train_dataloader()))
    assert episode.support_x.shape == (2, 2, 3, 16, 16)


def test_mini_imagenet_ravi_csv_errors(tmp_path):
    make_ravi_tree(tmp_path)
    (tmp_path / "images" / "n0700000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .*test.csv.*n0700000001"):
        MiniImageNetDataModule(tmp_path, **SMALL).setup()
    (tmp_path / "val.csv").write_text("name;class\nx;y\n")
    with pytest.raises(ValueError, match="header 'filename,label'"):
        MiniImageNetDataModule(tmp_path, **SMALL).setup()
    (tmp_path / "train.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['train.csv'\]"):
        MiniImageNetDataModule(tmp_path, **SMALL).setup()


def test_mini_imagenet_class_folders(tmp_path):
    make_class_tree(tmp_path / "train", ["n01", "n02", "n03"], ext="jpg")
    make_class_tree(tmp_path / "val", ["n04", "n05"], ext="jpg")
    make_class_tree(tmp_path / "test", ["n06", "n07"], ext="jpg")
    dm = MiniImageNetDataModule(tmp_path, **SMALL, **SMALL_EVAL)
    dm.setup()
    assert dm.layout == "folders"
    assert split_names(dm)["train"] == {"n01", "n02", "n03"}
    episode = next(iter(dm.train_dataloader()))
    assert episode.support_x.shape == (2, 2, 3, 84, 84)


def test_mini_imagenet_wrong_layout_shows_the_expected_trees(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError) as err:
        MiniImageNetDataModule(tmp_path, **SMALL).setup()
    message = str(err.value)
    assert "found 1 entries: readme.txt" in message
    for expected in ("mini-imagenet-cache-train.pkl", "{train,val,test}.csv", "train/<wnid>/*.jpg"):
        assert expected in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MiniImageNetDataModule(tmp_path / "missing", **SMALL).setup()
