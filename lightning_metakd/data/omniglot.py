"""Omniglot (Lake et al., Science 2015) read from a folder the user already has; no download."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_metakd.data.datamodule import EpisodicDataModule
from lightning_metakd.data.dataset import ClassDataset
from lightning_metakd.data.folder import (
    check_fractions,
    check_root,
    files_dataset,
    find_class_folders,
    layout_error,
    list_images,
    list_subfolders,
    seeded_split,
)

#: Characters in Omniglot's ``images_background`` (30 alphabets) and ``images_evaluation`` (20).
BACKGROUND_CHARACTERS = 964
EVALUATION_CHARACTERS = 659
#: Vinyals et al. (2016): the first 1,200 characters train, the last 423 test.
VINYALS_TRAIN_CHARACTERS = 1200
#: Validation characters carved from the end of the 1,200 training characters.
VINYALS_VAL_CHARACTERS = 100

OmniglotSplit = Literal["auto", "vinyals", "alphabet", "character"]

_SETS = ("images_background", "images_evaluation")
_OMNIGLOT_LAYOUTS = """\
  (a) <root>/images_background/<Alphabet>/characterNN/*.png   (Lake et al.'s zips, unpacked)
      <root>/images_evaluation/<Alphabet>/characterNN/*.png
  (b) <root>/omniglot-py/images_background/...                 (torchvision's download folder)
      <root>/omniglot-py/images_evaluation/...
  (c) <root>/<alphabet>/<character>/*.png                      (any tree of alphabets)"""

#: An Omniglot character: (alphabet, character folder name, sorted image paths).
Character = tuple[str, str, list[Path]]


def find_characters(root: Path) -> tuple[list[Character], list[Character], str]:
    """Walk an Omniglot tree: ``(background, evaluation, layout)``.

    ``layout`` is ``"official"`` for layouts (a) and (b), with ``background`` and ``evaluation``
    the two halves; ``"alphabets"`` for layout (c), with every character in ``background``.
    Alphabets and characters come in sorted order.
    """
    base = root / "omniglot-py" if (root / "omniglot-py").is_dir() else root
    halves = [base / name for name in _SETS]
    if any(half.is_dir() for half in halves):
        background, evaluation = (_alphabet_tree(half) if half.is_dir() else [] for half in halves)
        if not background and not evaluation:
            raise layout_error(
                "OmniglotDataModule",
                base,
                _OMNIGLOT_LAYOUTS,
                "images_background/ or images_evaluation/ is there but holds no "
                "<Alphabet>/<character>/*.png images.",
            )
        return background, evaluation, "official"
    characters = _alphabet_tree(root)
    if not characters:
        hint = (
            "Its sub-folders hold images directly: that is a class-per-folder tree, use "
            "FolderDataModule (or group the characters by alphabet)."
            if find_class_folders(root)
            else ""
        )
        raise layout_error("OmniglotDataModule", root, _OMNIGLOT_LAYOUTS, hint)
    return characters, [], "alphabets"


def _alphabet_tree(folder: Path) -> list[Character]:
    return [
        (alphabet.name, character.name, images)
        for alphabet in list_subfolders(folder)
        for character in list_subfolders(alphabet)
        if (images := list_images(character))
    ]


def vinyals_split(
    background: Sequence[Character], evaluation: Sequence[Character]
) -> tuple[list[Character], list[Character], list[Character]]:
    """The class split of Vinyals et al. (2016), "Matching Networks for One Shot Learning".

    All characters in sorted order — background alphabets, then evaluation alphabets, each
    alphabet's characters in order — are cut into the first 1,200 (training) and the last 423
    (test: characters 42-45 of Gurmukhi and the 12 evaluation alphabets after it, the list commonly
    used since). The last 100 of the 1,200 are held out for validation (characters 13-26 of Ge_ez,
    all of Glagolitic, characters 1-41 of Gurmukhi), leaving 1,100 for training: 1,100 / 100 / 423,
    the same for every seed.
    """
    ordered = sorted(background, key=_key) + sorted(evaluation, key=_key)
    cut = VINYALS_TRAIN_CHARACTERS - VINYALS_VAL_CHARACTERS
    return (
        ordered[:cut],
        ordered[cut:VINYALS_TRAIN_CHARACTERS],
        ordered[VINYALS_TRAIN_CHARACTERS:],
    )


def _key(character: Character) -> tuple[str, str]:
    return character[0], character[1]


def is_full_omniglot(background: Sequence[Character], evaluation: Sequence[Character]) -> bool:
    """Whether both halves of Omniglot are complete (964 and 659 characters)."""
    return len(background) == BACKGROUND_CHARACTERS and len(evaluation) == EVALUATION_CHARACTERS


def seeded_alphabet_split(
    characters: Sequence[Character], fractions: Sequence[float], seed: int
) -> tuple[list[Character], list[Character], list[Character]]:
    """Split whole alphabets by ``fractions`` (seeded): test alphabets are unseen in training."""
    alphabets = sorted({c[0] for c in characters})
    parts = seeded_split(alphabets, fractions, seed)
    return tuple(  # type: ignore[return-value]
        [c for c in characters if c[0] in set(part)] for part in parts
    )


class OmniglotDataModule(EpisodicDataModule):
    """Omniglot episodes (Lake et al., "Human-level concept learning through probabilistic program
    induction", Science 2015): 1,623 handwritten characters from 50 alphabets, 20 drawers each.

    Reads the data set from ``root`` in any of three layouts (walked directly: torchvision's
    ``Omniglot`` refuses a folder without the original zips):

    - (a) ``<root>/images_background/<Alphabet>/characterNN/*.png`` and ``images_evaluation/``;
    - (b) torchvision's ``<root>/omniglot-py/images_background/...``;
    - (c) any ``<root>/<alphabet>/<character>/*.png`` tree.

    Splits (``split``):

    - ``"vinyals"``: Vinyals et al. (2016)'s 1,200 training / 423 test characters, with the last
      100 training characters (sorted order) held out for validation: 1,100 / 100 / 423. Needs the
      full data set (964 + 659 characters); see :func:`vinyals_split`.
    - ``"alphabet"``: whole alphabets shuffled with ``seed`` and split by ``split_fractions``.
    - ``"character"``: characters shuffled with ``seed`` and split by ``split_fractions``.
    - ``"auto"`` (default): ``"vinyals"`` when both halves are complete, else ``"alphabet"`` when
      there are at least 3 alphabets, else ``"character"``.

    Images are inverted to white strokes on black, resized (antialiased) to ``image_size`` (28, as
    in Vinyals et al.) and have one channel: ``support_x`` is ``[T, N*K, 1, 28, 28]``. Class names
    are ``omniglot:<Alphabet>/<character>``; each split's groups are its alphabets, so
    ``grouping="alphabet"`` draws every task inside one alphabet (the harder, fine-grained tasks).
    Use ``rotations=True`` for the usual augmentation of training classes by 90° rotations.

    Args:
        root: the folder that holds the data set (see layouts above).
        split: how to split classes (see above).
        split_fractions: (train, val, test) fractions for the seeded splits.
        **kwargs: the task shape, episode counts, seed, loader settings and transforms of
            :class:`~lightning_metakd.data.EpisodicDataModule` (listed there).

    Example:
        >>> dm = OmniglotDataModule("~/data", ways=20, shots=1, rotations=True)  # doctest: +SKIP
        >>> dm.setup()  # doctest: +SKIP
        >>> [dm.splits[s].num_classes for s in ("train", "val", "test")]  # doctest: +SKIP
        [1100, 100, 423]
    """

    group_name = "alphabet"

    def __init__(
        self,
        root: str | Path,
        split: OmniglotSplit = "auto",
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        **kwargs: Any,
    ) -> None:
        if split not in ("auto", "vinyals", "alphabet", "character"):
            raise ValueError(
                f"split must be 'auto', 'vinyals', 'alphabet' or 'character', got {split!r}."
            )
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.split = split
        self.split_fractions = check_fractions(split_fractions)
        #: The split rule actually used (``split`` with ``"auto"`` resolved), set by :meth:`setup`.
        self.split_used: str | None = None

    def build_splits(self) -> dict[str, ClassDataset]:
        root = check_root(self.root, "OmniglotDataModule", _OMNIGLOT_LAYOUTS)
        background, evaluation, _ = find_characters(root)
        full = is_full_omniglot(background, evaluation)
        characters = sorted(background, key=_key) + sorted(evaluation, key=_key)
        rule = self.split
        if rule == "auto":
            if full:
                rule = "vinyals"
            else:
                rule = "alphabet" if len({c[0] for c in characters}) >= 3 else "character"
        if rule == "vinyals":
            if not full:
                raise ValueError(
                    "split='vinyals' needs the full Omniglot (964 background + 659 evaluation "
                    f"characters) but {str(root)!r} holds {len(background)} + {len(evaluation)}. "
                    "Unpack both images_background.zip and images_evaluation.zip, or use "
                    "split='alphabet' or 'character'."
                )
            parts = vinyals_split(background, evaluation)
        elif rule == "alphabet":
            parts = seeded_alphabet_split(characters, self.split_fractions, self.seed)
        else:
            parts = seeded_split(characters, self.split_fractions, self.seed)
        self.split_used = rule
        return {
            split: _omniglot_dataset(part, self.image_size)
            for split, part in zip(("train", "val", "test"), parts, strict=True)
        }


def _omniglot_dataset(characters: Sequence[Character], image_size: int) -> ClassDataset:
    classes, groups = {}, {}
    for alphabet, character, images in characters:
        name = f"omniglot:{alphabet}/{character}"
        if name in classes:
            raise ValueError(
                f"Character {alphabet}/{character} appears twice (in images_background/ and "
                "images_evaluation/); keep one copy."
            )
        classes[name] = images
        groups.setdefault(alphabet, []).append(name)
    return files_dataset(classes, image_size, channels=1, invert=True, groups=groups)
