"""Omniglot (Lake et al., Science 2015) read from the folders the user already has; no download."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_warn

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

#: Lake et al.'s zips, unpacked: the background sets (the full one and the two small ones of the
#: "few background alphabets" experiments) and the evaluation set.
BACKGROUND_SETS = ("images_background", "images_background_small1", "images_background_small2")
EVALUATION_SETS = ("images_evaluation",)
_OMNIGLOT_LAYOUTS = """\
  (a) <root>/images_background/<Alphabet>/characterNN/*.png   (Lake et al.'s zips, unpacked;
      <root>/images_evaluation/<Alphabet>/characterNN/*.png    any of them, side by side)
      <root>/images_background_small1/..., images_background_small2/...
  (b) <root>/omniglot-py/images_background/...                 (torchvision's download folder)
      <root>/omniglot-py/images_evaluation/...
  (c) <root>/<alphabet>/<character>/*.png                      (any tree of alphabets)
  Several roots (root: [a, b]) are read together."""

#: An Omniglot character: (alphabet, character folder name, sorted image paths).
Character = tuple[str, str, list[Path]]


def find_characters(root: Path) -> tuple[list[Character], list[Character], str]:
    """Walk an Omniglot tree: ``(background, evaluation, layout)``.

    ``layout`` is ``"official"`` for layouts (a) and (b), with ``background`` the characters of
    every background set present (``images_background``, ``images_background_small1``,
    ``images_background_small2``) and ``evaluation`` those of ``images_evaluation``;
    ``"alphabets"`` for layout (c), with every character in ``background``. Alphabets and
    characters come in sorted order within each set; a character found in several sets is listed
    once per set (see :func:`merge_duplicates`).
    """
    base = root / "omniglot-py" if (root / "omniglot-py").is_dir() else root
    present = [name for name in BACKGROUND_SETS + EVALUATION_SETS if (base / name).is_dir()]
    if present:
        background = [c for name in BACKGROUND_SETS if name in present for c in _tree(base, name)]
        evaluation = [c for name in EVALUATION_SETS if name in present for c in _tree(base, name)]
        if not background and not evaluation:
            raise layout_error(
                "OmniglotDataModule",
                base,
                _OMNIGLOT_LAYOUTS,
                f"{' and '.join(f'{name}/' for name in present)} "
                f"{'is there but holds' if len(present) == 1 else 'are there but hold'} no "
                "<Alphabet>/<character>/*.png images.",
            )
        return background, evaluation, "official"
    characters = _alphabet_tree(root)
    if not characters:
        hint = (
            "Its sub-folders hold images directly, so it looks like a single alphabet "
            "(<character>/*.png): point root at the folder above it, which holds the alphabet "
            "folders (root/<alphabet>/<character>/*.png). For a plain class-per-folder tree use "
            "FolderDataModule."
            if find_class_folders(root)
            else ""
        )
        raise layout_error("OmniglotDataModule", root, _OMNIGLOT_LAYOUTS, hint)
    return characters, [], "alphabets"


def _tree(base: Path, name: str) -> list[Character]:
    return _alphabet_tree(base / name) if (base / name).is_dir() else []


def _alphabet_tree(folder: Path) -> list[Character]:
    return [
        (alphabet.name, character.name, images)
        for alphabet in list_subfolders(folder)
        for character in list_subfolders(alphabet)
        if (images := list_images(character))
    ]


def _digest(path: Path) -> bytes:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).digest()


def merge_duplicates(characters: Sequence[Character]) -> tuple[list[Character], str | None]:
    """Keep each ``alphabet/character`` once: ``(characters, warning or None)``.

    Lake et al.'s two small background sets share alphabets with byte-identical images, and both
    are subsets of ``images_background``; a user who unpacks them side by side (or passes several
    roots) lists those characters more than once. A character found in several folders becomes one
    character: its first copy, plus the images of later copies whose bytes differ from every image
    before them. Only the files of such characters are hashed (BLAKE2b of the bytes), so a tree
    without duplicates costs nothing. The first copy keeps its place in the order.
    """
    copies: dict[tuple[str, str], list[list[Path]]] = {}
    for alphabet, character, images in characters:
        copies.setdefault((alphabet, character), []).append(images)
    repeated = [key for key, found in copies.items() if len(found) > 1]
    if not repeated:
        return list(characters), None
    dropped, merged = 0, {}
    for key in repeated:
        first, *later = copies[key]
        kept, seen = list(first), {_digest(path) for path in first}
        for images in later:
            for path in images:
                digest = _digest(path)
                if digest in seen:
                    dropped += 1
                else:
                    seen.add(digest)
                    kept.append(path)
        merged[key] = kept
    result, done = [], set()
    for alphabet, character, images in characters:
        key = (alphabet, character)
        if key not in done:
            done.add(key)
            result.append((alphabet, character, merged.get(key, images)))
    alphabet, character = repeated[0]
    folders = [str(images[0].parent.parent.parent) for images in copies[repeated[0]]]
    warning = (
        f"OmniglotDataModule: {len(repeated)} character(s) appear in more than one folder, e.g. "
        f"{alphabet}/{character} in {' and '.join(folders)}; each is kept once, and {dropped} "
        "byte-identical copies of their images were dropped. Pass one copy of each set to "
        "silence this."
    )
    return result, warning


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


#: What to change when there are too few alphabets, or characters, for the fractions.
ALPHABET_SPLIT_HINT = (
    "Use split='character' to split the characters instead of whole alphabets, add alphabets, or "
    "set split_fractions to (1, 0, 0) to meta-train on every character without validation or test."
)
CHARACTER_SPLIT_HINT = (
    "Add characters (Omniglot has 1,623 in 50 alphabets), or set split_fractions to (1, 0, 0) to "
    "meta-train on every character without validation or test."
)


def seeded_alphabet_split(
    characters: Sequence[Character], fractions: Sequence[float], seed: int
) -> tuple[list[Character], list[Character], list[Character]]:
    """Split whole alphabets by ``fractions`` (seeded): test alphabets are unseen in training."""
    alphabets = sorted({c[0] for c in characters})
    parts = seeded_split(alphabets, fractions, seed, noun="alphabet(s)", hint=ALPHABET_SPLIT_HINT)
    return tuple(  # type: ignore[return-value]
        [c for c in characters if c[0] in set(part)] for part in parts
    )


class OmniglotDataModule(EpisodicDataModule):
    """Omniglot episodes (Lake et al., "Human-level concept learning through probabilistic program
    induction", Science 2015): 1,623 handwritten characters from 50 alphabets, 20 drawers each.

    Reads the data set from ``root`` — one folder, or several (``root: [a, b]``) read together —
    in any of three layouts (walked directly: torchvision's ``Omniglot`` refuses a folder without
    the original zips):

    - (a) Lake et al.'s zips unpacked side by side, any of them:
      ``<root>/images_background/<Alphabet>/characterNN/*.png``, ``images_evaluation/``, and the
      small background sets ``images_background_small1/`` and ``images_background_small2/``;
    - (b) torchvision's ``<root>/omniglot-py/images_background/...``;
    - (c) any ``<root>/<alphabet>/<character>/*.png`` tree.

    A character found in more than one folder (the small sets share alphabets with byte-identical
    images, and both are subsets of ``images_background``) is kept once, with a warning; see
    :func:`merge_duplicates`.

    Splits (``split``):

    - ``"vinyals"``: Vinyals et al. (2016)'s 1,200 training / 423 test characters, with the last
      100 training characters (sorted order) held out for validation: 1,100 / 100 / 423. Needs the
      full data set (964 + 659 characters); see :func:`vinyals_split`.
    - ``"alphabet"``: whole alphabets shuffled with ``seed`` and split by ``split_fractions``.
    - ``"character"``: characters shuffled with ``seed`` and split by ``split_fractions``.
    - ``"auto"`` (default): ``"vinyals"`` when both halves are complete and ``split_fractions``
      asks for val and test classes, else ``"alphabet"`` when there are enough alphabets for the
      fractions (3, or fewer when a fraction is zero), else ``"character"``.

    ``split_fractions=(1, 0, 0)`` meta-trains on every character, with no validation (Lightning
    skips it) and no test split (``test`` stops with an error); see
    :class:`~lightning_metakd.data.EpisodicDataModule`.

    Images are inverted to white strokes on black, resized (antialiased) to ``image_size`` (28, as
    in Vinyals et al.) and have one channel: ``support_x`` is ``[T, N*K, 1, 28, 28]``. Class names
    are ``omniglot:<Alphabet>/<character>``; each split's groups are its alphabets, so
    ``grouping="alphabet"`` draws every task inside one alphabet (the harder, fine-grained tasks).
    Use ``rotations=True`` for the usual augmentation of training classes by 90° rotations.

    Args:
        root: the folder that holds the data set (see layouts above), or a list of such folders.
        split: how to split classes (see above).
        split_fractions: (train, val, test) fractions for the seeded splits; a zero fraction means
            no such split (``(1, 0, 0)``: meta-train on every character).
        **kwargs: the task shape, episode counts, seed, loader settings and transforms of
            :class:`~lightning_metakd.data.EpisodicDataModule` (listed there).

    Example::

        dm = OmniglotDataModule("~/data", ways=20, shots=1, rotations=True)
        dm.setup()
        [dm.splits[s].num_classes for s in ("train", "val", "test")]
        # [1100, 100, 423]
    """

    group_name = "alphabet"

    def __init__(
        self,
        root: str | Path | list[str | Path],
        split: OmniglotSplit = "auto",
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        **kwargs: Any,
    ) -> None:
        if split not in ("auto", "vinyals", "alphabet", "character"):
            raise ValueError(
                f"split must be 'auto', 'vinyals', 'alphabet' or 'character', got {split!r}."
            )
        super().__init__(**kwargs)
        roots = [root] if isinstance(root, str | Path) else list(root)
        if not roots:
            raise ValueError("root is an empty list; pass the folder(s) that hold Omniglot.")
        self.roots = [Path(r).expanduser() for r in roots]
        self.root = self.roots[0] if isinstance(root, str | Path) else self.roots
        self.split = split
        self.split_fractions = check_fractions(split_fractions)
        if split == "vinyals" and 0 in self.split_fractions[1:]:
            raise ValueError(
                "split='vinyals' is Vinyals et al.'s fixed 1,100 / 100 / 423 character split and "
                f"does not use split_fractions={self.split_fractions}; for a split without "
                "validation or test use split='alphabet' or 'character' (or 'auto')."
            )
        #: The split rule actually used (``split`` with ``"auto"`` resolved), set by :meth:`setup`.
        self.split_used: str | None = None

    def describe_source(self) -> str:
        return f"split {self.split_used!r}" if self.split_used else ""

    def build_splits(self) -> dict[str, ClassDataset]:
        background, evaluation = [], []
        for root in self.roots:
            found = find_characters(check_root(root, "OmniglotDataModule", _OMNIGLOT_LAYOUTS))
            background += found[0]
            evaluation += found[1]
        merged, warning = merge_duplicates(background + evaluation)
        if warning:
            rank_zero_warn(warning)
        in_evaluation = {_key(c) for c in evaluation} - {_key(c) for c in background}
        background = [c for c in merged if _key(c) not in in_evaluation]
        evaluation = [c for c in merged if _key(c) in in_evaluation]
        full = is_full_omniglot(background, evaluation)
        characters = sorted(background, key=_key) + sorted(evaluation, key=_key)
        fractions = self.split_fractions
        rule = self.split
        if rule == "auto":
            need = 1 + sum(f > 0 for f in fractions[1:])
            if full and need == 3:
                rule = "vinyals"
            else:
                rule = "alphabet" if len({c[0] for c in characters}) >= need else "character"
        if rule == "vinyals":
            if not full:
                where = ", ".join(repr(str(r)) for r in self.roots)
                raise ValueError(
                    "split='vinyals' needs the full Omniglot (964 background + 659 evaluation "
                    f"characters) but {where} holds {len(background)} + {len(evaluation)}. "
                    "Unpack both images_background.zip and images_evaluation.zip, or use "
                    "split='alphabet' or 'character' (or 'auto')."
                )
            parts = vinyals_split(background, evaluation)
        elif rule == "alphabet":
            parts = seeded_alphabet_split(characters, fractions, self.seed)
        else:
            parts = seeded_split(
                characters, fractions, self.seed, noun="character(s)", hint=CHARACTER_SPLIT_HINT
            )
        self.split_used = rule
        return {
            split: _omniglot_dataset(part, self.image_size)
            for split, part in zip(("train", "val", "test"), parts, strict=True)
            if part
        }


def _omniglot_dataset(characters: Sequence[Character], image_size: int) -> ClassDataset:
    classes, groups = {}, {}
    for alphabet, character, images in characters:
        name = f"omniglot:{alphabet}/{character}"
        classes[name] = images
        groups.setdefault(alphabet, []).append(name)
    return files_dataset(classes, image_size, channels=1, invert=True, groups=groups)
