"""The three class-disjoint splits of a data source: what a source must return, and its summary."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

from lightning.pytorch.utilities import rank_zero_only

from lightning_metakd.data.dataset import ClassDataset, check_image_files

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


def checked_splits(name: str, built: Mapping[str, ClassDataset | None]) -> dict[str, ClassDataset]:
    """The non-empty splits of ``built`` (what ``name.build_splits()`` returned), checked.

    A split name outside :data:`SPLITS`, no train split, two splits sharing a class, or an image
    file that does not open is an error that names the cause.
    """
    unknown = sorted(set(built) - set(SPLITS))
    if unknown:
        raise ValueError(
            f"{name}.build_splits() returned unknown split(s) {unknown}; the splits are "
            f"{list(SPLITS)}."
        )
    splits = {s: built[s] for s in SPLITS if built.get(s) is not None and built[s].num_classes}
    if "train" not in splits:
        raise ValueError(
            f"{name}.build_splits() returned no train split (or one without classes); "
            "meta-training needs one."
        )
    names = {s: set(ds.base_class_names) for s, ds in splits.items()}
    present = list(splits)
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            shared = names[a] & names[b]
            if shared:
                raise ValueError(
                    f"The {a} and {b} splits share {len(shared)} class(es), e.g. "
                    f"{sorted(shared)[:3]}; class splits must be disjoint. Keep each class in "
                    "one split (a class folder copied into two split folders is the usual "
                    "cause)."
                )
    check_image_files(
        [path for ds in splits.values() for path in ds.image_files()],
        progress=rank_zero_only.rank == 0,
    )
    return splits  # type: ignore[return-value]


def split_summary(
    name: str,
    splits: Mapping[str, ClassDataset],
    source: str = "",
    group_name: str = "group",
    extra_groups: tuple[str, Callable[[str], bool]] | None = None,
) -> str:
    """The split sizes, as printed at setup: classes, images and groups of each split.

    ``name`` is the data module's, ``source`` a few words on how it found its data, ``group_name``
    what its groups are (alphabet, radical). For each evaluation split, the groups it holds out
    from training. ``extra_groups``: ``(what they are, which groups)`` for groups of another kind
    beside them (KanjiVG's simple characters), counted apart: ``80 radicals + 8 simple-character
    groups``.
    """
    classes = sum(len(ds.base_class_names) for ds in splits.values())
    images = sum(len(ds.base_labels) for ds in splits.values())
    note = f" ({source})" if source else ""
    lines = [f"{name}{note}: {classes:,} classes, {images:,} images"]
    train_groups = set(splits["train"].base_groups)
    for split in SPLITS:
        ds = splits.get(split)
        if ds is None:
            off = "validation is off" if split == "val" else "test and predict are off"
            lines.append(f"  {split:5s}  none ({off})")
            continue
        line = (
            f"  {split:5s}  {len(ds.base_class_names):5,d} classes  "
            f"{len(ds.base_labels):7,d} images"
        )
        if ds.base_groups:
            extra_name, is_extra = extra_groups or ("", lambda group: False)
            extra = sum(map(is_extra, ds.base_groups))
            count = len(ds.base_groups) - extra
            line += f"  {count:3,d} {group_name}{'' if count == 1 else 's'}"
            if extra:
                line += f" + {extra} {extra_name}{'' if extra == 1 else 's'}"
            if split != "train":
                held_out = sorted(set(ds.base_groups) - train_groups)
                shown = ", ".join(held_out[:3]) + (", ..." if len(held_out) > 3 else "")
                line += f", {len(held_out)} held out" + (f": {shown}" if held_out else "")
        if ds.rotations > 1:
            line += f"  (x{ds.rotations} rotations: {ds.num_classes:,} classes)"
        lines.append(line)
    return "\n".join(lines)
