"""What the paired step-time benchmarks share: quartiles of per-step ratios and the JSON they write.

``distill_step.py`` and ``conv_layout.py`` time their variants in turns and compare them step by
step; :func:`quantiles` summarises those ratios, :func:`write_results` writes the run's table with
the date, machine and torch version beside it.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """The first quartile, median and third quartile of ``values``."""
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def write_results(path: Path, **fields: Any) -> None:
    """``fields`` as JSON in ``path``, after the date, machine and torch version; says where."""
    import torch

    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwritten {path}")
