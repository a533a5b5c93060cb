"""Setup checks every image file of the file-based sources, and names each bad one at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_real_data import (
    SMALL,
    SMALL_EVAL,
    make_alphabets,
    make_class_tree,
    make_ravi_tree,
    write,
    write_caches,
)

from lightning_metakd.data import (
    ClassDataset,
    FolderDataModule,
    MiniImageNetDataModule,
    OmniglotDataModule,
)
from lightning_metakd.data import dataset as dataset_module
from lightning_metakd.data.dataset import check_image_files, image_file_problem


def split_tree(root: Path, ext: str = "png") -> None:
    make_class_tree(root / "train", ["a", "b"], ext=ext)
    make_class_tree(root / "val", ["c", "d"], ext=ext)
    make_class_tree(root / "test", ["e", "f"], ext=ext)


def test_every_bad_file_is_named_in_one_error_at_setup(tmp_path):
    split_tree(tmp_path)
    text = tmp_path / "train" / "a" / "01.png"
    text.write_text("this is not a png")
    empty = tmp_path / "val" / "d" / "00.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "test" / "f" / "02.png"
    truncated.write_bytes(truncated.read_bytes()[:40])
    dm = FolderDataModule(tmp_path, image_size=8, **SMALL, **SMALL_EVAL)
    with pytest.raises(OSError) as err:
        dm.setup()
    assert str(err.value) == (
        "3 of 18 image files cannot be read; replace or remove them (a truncated copy, or a "
        "non-image file named like an image, is the usual cause):\n"
        f"  {text}: not an image (17 bytes starting b'this is not a pn')\n"
        f"  {empty}: an empty file (0 bytes)\n"
        f"  {truncated}: a truncated or damaged PNG (40 bytes; PIL cannot identify it)"
    )
    assert dm.splits == {}  # a failed setup leaves nothing half-built behind


def test_a_png_with_a_broken_chunk_is_caught(tmp_path):
    make_class_tree(tmp_path, ["a"], per_class=1)
    path = tmp_path / "a" / "00.png"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # inside the image data: the chunk's CRC no longer matches
    path.write_bytes(bytes(data))
    problem = image_file_problem(path)
    assert problem is not None and problem.startswith("a damaged image (")


def test_many_bad_files_are_counted_beyond_the_limit(tmp_path):
    paths = []
    for i in range(dataset_module.BAD_FILES_SHOWN + 5):
        write(tmp_path / f"{i:02d}.png", b"")
        paths.append(tmp_path / f"{i:02d}.png")
    with pytest.raises(OSError) as err:
        check_image_files(paths)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("25 of 25 image files cannot be read")
    assert len(lines) == 1 + dataset_module.BAD_FILES_SHOWN + 1
    assert lines[-2] == f"  {tmp_path / '19.png'}: an empty file (0 bytes)"
    assert lines[-1] == "  ... and 5 more"


def test_large_trees_show_a_progress_bar(tmp_path, monkeypatch, capsys):
    make_class_tree(tmp_path, ["a", "b"], per_class=3)
    paths = sorted(tmp_path.glob("*/*.png"))
    monkeypatch.setattr(dataset_module, "PROGRESS_FILES", 5)
    check_image_files(paths)
    assert "Checking image files" in capsys.readouterr().err
    check_image_files(paths, progress=False)
    check_image_files(paths[:4])
    assert "Checking image files" not in capsys.readouterr().err


def test_omniglot_files_are_checked(tmp_path):
    make_alphabets(tmp_path, {"Alpha": 4, "Beta": 3, "Gamma": 4})
    bad = tmp_path / "Beta" / "character02" / "0102_02.png"
    bad.write_text("<html>404</html>")
    with pytest.raises(OSError, match=r"1 of 33 image files cannot be read") as err:
        OmniglotDataModule(tmp_path, **SMALL, **SMALL_EVAL).setup()
    assert f"  {bad}: not an image (16 bytes starting b'<html>404</html>')" in str(err.value)


@pytest.mark.parametrize(("layout", "files"), [("folders", 18), ("csv", 21)])
def test_mini_imagenet_image_layouts_are_checked(tmp_path, layout, files):
    if layout == "folders":
        split_tree(tmp_path, ext="jpg")
        bad = tmp_path / "val" / "c" / "01.jpg"
    else:
        make_ravi_tree(tmp_path)
        bad = tmp_path / "images" / "n0400000001.jpg"
    bad.write_bytes(b"")
    with pytest.raises(OSError, match=rf"1 of {files} image files cannot be read") as err:
        MiniImageNetDataModule(tmp_path, **SMALL, **SMALL_EVAL).setup()
    assert f"  {bad}: an empty file (0 bytes)" in str(err.value)


def test_in_memory_images_have_no_files_to_check(tmp_path):
    write_caches(tmp_path)
    dm = MiniImageNetDataModule(tmp_path, image_size=12, **SMALL, **SMALL_EVAL)
    dm.setup()
    assert all(ds.image_files() == [] for ds in dm.splits.values())
    memory = ClassDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), [0, 1], ["x", "y"])
    assert memory.image_files() == []
