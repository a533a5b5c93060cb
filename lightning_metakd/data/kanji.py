"""The embedded default data set: KanjiVG characters rendered offline as hand-drawn images.

Classes are kanji, grouped by radical (a stand-in for Omniglot's alphabets), and the train, val and
test splits hold disjoint radical groups, so test characters come from radicals never trained on.
The images are rendered once on the user's machine and cached; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_metakd.atomic import atomic_write
from lightning_metakd.data.datamodule import EpisodicDataModule
from lightning_metakd.data.dataset import ClassDataset
from lightning_metakd.data.folder import check_fractions
from lightning_metakd.data.kanji_handwriting import HandwritingConfig, MixedConfig
from lightning_metakd.data.kanji_render import (
    KanjiStrokes,
    RenderConfig,
    RenderStyle,
    kanjivg_version,
    load_kanjivg,
    render_samples,
)
from lightning_metakd.data.kanji_simple import (
    HELD_OUT,
    check_simple_strokes,
    is_simple_group,
    simple_characters,
)
from lightning_metakd.data.synthetic_glyphs import cache_key as synthetic_cache_key
from lightning_metakd.data.synthetic_glyphs import check_synthetic_count, synthetic_glyphs

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; concurrent renders there are not protected.
    fcntl = None

#: Bump whenever the renderer or the cache layout changes: old cache files are then ignored.
CACHE_FORMAT_VERSION = 1
#: The drawings are a fixed data set: ``seed`` picks splits and episodes, never the drawings.
RENDER_SEED = 0
#: ``render_style`` -> how characters are drawn. "classic" is the original renderer (its cache
#: files keep their names); "handwriting" the domain-randomised one (docs/handwriting.md); "mixed"
#: either one per drawing, half and half on average (MixedConfig).
RENDER_STYLES: dict[str, type[RenderStyle]] = {
    "classic": RenderConfig,
    "handwriting": HandwritingConfig,
    "mixed": MixedConfig,
}


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning_metakd``, or ``~/.cache/lightning_metakd``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightning_metakd"


def select_kanji(
    min_group_size: int = 10,
    max_classes_per_group: int | None = None,
    max_classes: int | None = None,
) -> list[KanjiStrokes]:
    """The characters of the data set, ordered by radical group, largest group first.

    Characters without a radical, and radical groups with fewer than ``min_group_size``
    characters, are dropped. Each group then keeps its first ``max_classes_per_group`` characters
    (by code point) and the whole list its first ``max_classes``: the result depends only on these
    arguments and the KanjiVG version, never on a seed.
    """
    by_group: dict[str, list[KanjiStrokes]] = {}
    for kanji in load_kanjivg():
        if kanji.radical is not None:
            by_group.setdefault(kanji.radical, []).append(kanji)
    groups = sorted(
        (members for members in by_group.values() if len(members) >= min_group_size),
        key=lambda members: (-len(members), members[0].radical),
    )
    selected = [kanji for members in groups for kanji in members[:max_classes_per_group]]
    return selected[:max_classes]


class KanjiDataModule(EpisodicDataModule):
    """Few-shot episodes of KanjiVG characters drawn like Omniglot: the zero-download default.

    Each class is one kanji; its ``samples_per_class`` images are drawn from its KanjiVG strokes
    with random pen width, per-stroke wobble and an affine jitter per image (see
    :class:`~lightning_metakd.data.kanji_render.RenderConfig`), white strokes on black, at
    ``image_size`` pixels. Classes are grouped by radical (``grouping="radical"`` draws each task
    from one radical: fine-grained tasks, like within-alphabet Omniglot tasks). The radical
    *groups* are split ``split_fractions`` between train, val and test (seeded by ``seed``), so
    evaluation characters come from radicals never seen in training. On raw pixels the default
    drawings are about as hard as Omniglot (Vinyals et al. 2016, Matching Networks, Table 1); see
    ``benchmarks/pixel_baseline.py``.

    Rendering (5,857 default characters x 20: about 50 s on one core, 26 s in two processes)
    happens once, in :meth:`prepare_data`; the images are cached as one ``.npz`` (about 26 MB) in
    ``cache_dir`` (default ``$XDG_CACHE_HOME/lightning_metakd`` or ``~/.cache/lightning_metakd``),
    whose name encodes the format version and a hash of every render parameter. The write is
    atomic, checked by a checksum on load (a partial or corrupt file is re-rendered) and guarded by
    a file lock, so several DDP processes may call :meth:`setup` at once.

    Stroke data: KanjiVG, copyright Ulrich Apel and the KanjiVG project, https://kanjivg.tagaini.net,
    licensed CC BY-SA 3.0; the rendered images are a derivative work under the same licence.

    Args:
        cache_dir: folder of the rendered cache (created if needed).
        samples_per_class: drawings of each character.
        min_group_size: radical groups with fewer characters are dropped (defaults keep 115 of 267
            groups, 5,857 characters).
        max_classes_per_group: keep at most this many characters of each group.
        max_classes: keep at most this many characters in all (largest groups first): tiny renders
            for tests and quick starts.
        split_fractions: fractions of the radical groups in train, val and test; a zero fraction
            means no such split (``(1, 0, 0)``: meta-train on every group).
        render_style: ``"classic"`` (the default drawings above) or ``"handwriting"``: pens of
            varying width and pressure, a hand that wobbles and drifts in stroke order, elastic
            paper, missing strokes and scanner blur and thresholds (domain randomisation, see
            :mod:`~lightning_metakd.data.kanji_handwriting`), for models that must work on real
            handwriting. Same characters and splits; its own cache file (``-handwriting-`` in the
            name, about 2 minutes to render). ``"mixed"``: each drawing in one of the two styles,
            handwriting with probability 1/2 (:class:`~lightning_metakd.data.kanji_handwriting.
            MixedConfig`), its own cache file too.
        render_processes: processes that render a missing cache (spawned; the drawings are the
            same for any number). 1 by default: spawned workers re-import the calling script,
            so a script that renders with more must keep its top-level code under
            ``if __name__ == "__main__":`` (the ``metakd`` command and notebooks are fine).
        simple_characters: add the simple characters of KanjiVG of at most this many strokes —
            kana and the components of kanji, cut out and scaled to the box
            (:mod:`~lightning_metakd.data.kanji_simple`; 277 classes at 6) — to the *training*
            split, in groups of their own (kana by script, components by stroke count): shapes
            closer to digits, letters and symbols than kanji are, for models that must adapt to
            those. Components that are, or were cut out of, a validation or test group's
            characters are left out; validation and test are the same as without them. ``0``
            (the default): none. Its own cache file.
        synthetic_characters: add this many synthetic glyphs — random loops, curves and lines,
            one to three strokes (:mod:`~lightning_metakd.data.synthetic_glyphs`), the shapes of
            digits that kanji lack — to the *training* split, in six groups of their own (by
            stroke count, with or without a loop). Validation and test are the same as without
            them. ``0`` (the default): none. Its own cache file.
        **kwargs: the task shape, episode counts, seed and loader settings of
            :class:`~lightning_metakd.data.EpisodicDataModule` (listed there); ``image_size`` is
            the rendered size (no resampling afterwards).

    Example::

        dm = KanjiDataModule(ways=5, shots=1, grouping="radical", max_classes=60,
                             max_classes_per_group=12)
        dm.prepare_data(); dm.setup("fit")  # renders 60 x 20 images once
        episode = next(iter(dm.train_dataloader()))
        episode.support_x.shape  # [meta_batch_size, ways*shots, 1, size, size]
        # torch.Size([32, 5, 1, 28, 28])
    """

    group_name = "radical"

    def __init__(
        self,
        cache_dir: str | None = None,
        samples_per_class: int = 20,
        min_group_size: int = 10,
        max_classes_per_group: int | None = None,
        max_classes: int | None = None,
        split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
        render_style: str = "classic",
        render_processes: int = 1,
        simple_characters: int = 0,
        synthetic_characters: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if render_style not in RENDER_STYLES:
            raise ValueError(
                f"render_style must be one of {sorted(RENDER_STYLES)}, got {render_style!r}."
            )
        for name, value in (
            ("samples_per_class", samples_per_class),
            ("min_group_size", min_group_size),
            ("max_classes_per_group", max_classes_per_group),
            ("max_classes", max_classes),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        fractions = check_fractions(split_fractions)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.samples_per_class = samples_per_class
        self.min_group_size = min_group_size
        self.max_classes_per_group = max_classes_per_group
        self.max_classes = max_classes
        self.split_fractions = fractions
        self.render_style = render_style
        if render_processes < 1:
            raise ValueError(f"render_processes must be at least 1, got {render_processes}.")
        self.render_processes = render_processes
        self.simple_characters = check_simple_strokes(simple_characters) if simple_characters else 0
        self.synthetic_characters = check_synthetic_count(synthetic_characters)
        self.render_config = RENDER_STYLES[render_style](image_size=self.image_size)

    @property
    def cache_params(self) -> dict:
        """Everything the rendered images depend on (hashed into the cache file name)."""
        return (
            {
                "format_version": CACHE_FORMAT_VERSION,
                "kanjivg_version": kanjivg_version(),
                "render": self.render_config.as_dict(),
                "render_seed": RENDER_SEED,
                "samples_per_class": self.samples_per_class,
                "min_group_size": self.min_group_size,
                "max_classes_per_group": self.max_classes_per_group,
                "max_classes": self.max_classes,
            }
            | ({"simple_characters": self.simple_characters} if self.simple_characters else {})
            | (
                {"synthetic_characters": synthetic_cache_key(self.synthetic_characters)}
                if self.synthetic_characters
                else {}
            )
        )

    @property
    def cache_path(self) -> Path:
        """The cache file of these render parameters, e.g. ``kanjivg-v1-28px-20x-<hash>.npz``
        (``kanjivg-v1-handwriting-28px-20x-<hash>.npz`` for the handwriting style)."""
        params = self.cache_params
        digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        style = "" if self.render_style == "classic" else f"-{self.render_style}"
        name = (
            f"kanjivg-v{CACHE_FORMAT_VERSION}{style}-{self.image_size}px-{self.samples_per_class}x"
        )
        return self.cache_dir / f"{name}-{digest}.npz"

    def prepare_data(self) -> None:
        """Render the data set into the cache unless a valid cache file is already there."""
        self.load_or_render()

    def load_or_render(self) -> dict[str, np.ndarray]:
        """The cached arrays, rendered first (under an exclusive file lock) if missing or corrupt.

        Keys: ``images`` uint8 ``[num_classes * samples_per_class, 1, H, W]``, ``labels`` int64,
        ``codepoints`` int64 ``[num_classes]``, ``characters``, ``class_names`` and ``radicals``
        (strings, one per class: the group; ``simple:...`` for the simple characters and the
        synthetic glyphs), and with ``simple_characters`` or ``synthetic_characters`` also
        ``sources`` (the radical group a component was cut from, else ``""``).
        """
        path = self.cache_path
        data = _read_cache(path, warn=False)
        if data is not None:
            return data
        path.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(path.with_name(path.name + ".lock")):
            data = _read_cache(path)  # another process may have rendered it while we waited
            if data is None:
                data = self._render()
                _write_cache(path, data, self.cache_params)
        return data

    def _render(self) -> dict[str, np.ndarray]:
        kanji = select_kanji(self.min_group_size, self.max_classes_per_group, self.max_classes)
        if not kanji:
            raise ValueError(
                f"No KanjiVG radical group has at least min_group_size={self.min_group_size} "
                "characters; lower min_group_size."
            )
        if self.simple_characters:
            kanji = kanji + simple_characters(kanji, self.simple_characters)
        kanji = kanji + synthetic_glyphs(self.synthetic_characters)
        images = render_samples(
            kanji,
            self.samples_per_class,
            self.render_config,
            RENDER_SEED,
            processes=self.render_processes,
        )
        return {
            "images": images,
            "labels": np.repeat(np.arange(len(kanji), dtype=np.int64), self.samples_per_class),
            "codepoints": np.asarray([k.codepoint for k in kanji], dtype=np.int64),
            "characters": np.asarray([k.character for k in kanji]),
            "class_names": np.asarray([k.class_name for k in kanji]),
            "radicals": np.asarray([k.radical for k in kanji]),
        } | (
            {"sources": np.asarray([k.source or "" for k in kanji])}
            if self.simple_characters or self.synthetic_characters
            else {}
        )

    def extra_groups(self) -> tuple[str, Callable[[str], bool]]:
        """The simple characters' and synthetic glyphs' groups, counted apart from radicals."""
        return "simple-character group", is_simple_group

    def split_groups(self, radicals: list[str]) -> dict[str, list[str]]:
        """Assign radical groups to ``train``/``val``/``test`` by ``split_fractions``, seeded.

        Val and test get ``round(fraction * groups)`` groups each, at least one (none for a zero
        fraction: no such split); train the rest.
        """
        names = sorted(set(radicals))
        order = [names[i] for i in np.random.default_rng(self.seed).permutation(len(names))]
        _, f_val, f_test = self.split_fractions
        n_val, n_test = (0 if f == 0 else max(1, round(f * len(names))) for f in (f_val, f_test))
        n_train = len(names) - n_val - n_test
        if n_train < 1:
            raise ValueError(
                f"{len(names)} radical group(s) cannot be split into non-empty train, val and test "
                f"parts with split_fractions={self.split_fractions}. Keep more groups: raise "
                "max_classes, lower max_classes_per_group or min_group_size; or set "
                "split_fractions to (1, 0, 0) to meta-train on every group without val or test."
            )
        return {
            "train": order[:n_train],
            "val": order[n_train : n_train + n_val],
            "test": order[n_train + n_val :],
        }

    def build_splits(self) -> dict[str, ClassDataset]:
        """Load (or render) the cache and slice it into three radical-disjoint splits."""
        data = self.load_or_render()
        radicals = data["radicals"].tolist()
        class_names = data["class_names"].tolist()
        labels = data["labels"]
        images = torch.from_numpy(data["images"])
        splits = {}
        parts = self.split_groups([r for r in radicals if not is_simple_group(r)])
        if "sources" in data:
            radicals = self._hold_out_components(radicals, data, parts)
            parts["train"] += sorted({r for r in radicals if is_simple_group(r)} - {HELD_OUT})
        for split, groups in parts.items():
            if not groups:
                continue  # a zero fraction: no such split
            members = sorted(set(groups))
            classes = [c for c, r in enumerate(radicals) if r in members]
            local = np.full(len(radicals), -1, dtype=np.int64)
            local[classes] = np.arange(len(classes))
            rows = np.flatnonzero(local[labels] >= 0)
            splits[split] = ClassDataset(
                images[torch.from_numpy(rows)],
                local[labels[rows]],
                [class_names[c] for c in classes],
                groups={g: [int(local[c]) for c in classes if radicals[c] == g] for g in members},
                image_size=self.image_size,
                channels=1,
            )
        return splits

    @staticmethod
    def _hold_out_components(
        radicals: list[str], data: dict[str, np.ndarray], parts: dict[str, list[str]]
    ) -> list[str]:
        """``radicals`` with the components that must not train beside ``parts`` moved to a
        group no split takes: those cut out of a validation or test character, and those that
        are the radical of a validation or test group."""
        held_out = set(parts["val"]) | set(parts["test"])
        sources, characters = data["sources"].tolist(), data["characters"].tolist()
        return [
            HELD_OUT
            if is_simple_group(group) and (sources[c] in held_out or characters[c] in held_out)
            else group
            for c, group in enumerate(radicals)
        ]


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (blocks until other holders release it)."""
    with open(path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _checksum(data: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(data):
        array = np.ascontiguousarray(data[key])
        digest.update(f"{key}:{array.dtype.str}:{array.shape}".encode())
        digest.update(array.view(np.uint8) if array.ndim else array.tobytes())
    return digest.hexdigest()


#: zlib level of the cache file: 1 writes the default cache in a third of level 6's time (on the
#: 2-core CPU 2.2 s instead of 7.6 s, while the other training stages wait for it) for a file of
#: 30 MB instead of 26; it reads as fast.
CACHE_COMPRESSION_LEVEL = 1


def _write_cache(path: Path, data: dict[str, np.ndarray], params: dict) -> None:
    """Write ``data`` with a header holding ``params`` and a checksum, atomically: an ``.npz``
    (what ``np.savez_compressed`` writes, at :data:`CACHE_COMPRESSION_LEVEL`)."""
    header = json.dumps({"params": params, "checksum": _checksum(data)}, sort_keys=True)
    arrays = {"header": np.asarray(header), **data}

    def write(handle) -> None:  # noqa: ANN001 - a binary file
        with zipfile.ZipFile(
            handle, "w", zipfile.ZIP_DEFLATED, compresslevel=CACHE_COMPRESSION_LEVEL
        ) as archive:
            for key, array in arrays.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

    atomic_write(path, write)
    _remember(path, data)


#: The cache file read (or written) last in this process, by path, size and modification time,
#: with its arrays: the stages of one process (the pipeline's teacher, distilled student and
#: report) then read the file once (2-3 s each on the 2-core CPU). About 100 MB stay in memory.
_LAST_CACHE: tuple[tuple[str, int, int], dict[str, np.ndarray]] | None = None


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _remember(path: Path, data: dict[str, np.ndarray]) -> None:
    global _LAST_CACHE
    _LAST_CACHE = (_file_key(path), dict(data))  # its own dict: callers get copies of it


_CACHE_KEYS = ("images", "labels", "codepoints", "characters", "class_names", "radicals")
_OPTIONAL_CACHE_KEYS = ("sources",)


def _read_cache(path: Path, warn: bool = True) -> dict[str, np.ndarray] | None:
    """The cached arrays, or ``None`` if the file is missing, partial or fails its checksum."""
    if not path.exists():
        return None
    if _LAST_CACHE is not None and _LAST_CACHE[0] == _file_key(path):
        return dict(_LAST_CACHE[1])
    try:
        with np.load(path, allow_pickle=False) as archive:
            header = json.loads(str(archive["header"]))
            data = {key: archive[key] for key in _CACHE_KEYS}
            data |= {key: archive[key] for key in _OPTIONAL_CACHE_KEYS if key in archive.files}
        if header.get("checksum") != _checksum(data):
            raise ValueError("checksum mismatch")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        if warn:
            warnings.warn(
                f"The KanjiVG cache {path} is incomplete or corrupt ({err}); rendering it again.",
                stacklevel=3,
            )
        return None
    _remember(path, data)
    return dict(data)
