"""glibc's malloc tuned for meta-training on CPU: keep freed activation memory instead of unmapping it.

A meta-training step on CPU allocates and frees the same activation-sized buffers (megabytes each)
hundreds of times: every task's support forward, inner gradient, query forward and backward.
glibc serves blocks above its mmap threshold with a fresh ``mmap`` and unmaps them on ``free``, and
returns the top of the heap to the system above its trim threshold; both thresholds adapt, but not
to this pattern. Every step then page-faults and zeroes much of its working set again: about
500,000 page faults per second-order Conv4-64 MAML step of 32 tasks (``getrusage``). With the mmap
threshold at 8 MiB and a trim threshold of 256 MiB, blocks up to 8 MiB are reused from the heap:
about 130,000 faults and steps 1.06-1.2x faster (``benchmarks/maml_step.py``, 1 and 5 inner
steps, paired rounds), for any implementation in the process (learn2learn's included), and a
lower, steadier peak in six runs of one step (176-181 MB against 177-209 with the defaults).
A 32 MiB threshold (glibc's maximum) removes nearly every fault (1.35x) but fragments the heap:
a peak of 193-208 MB. Measured with ``benchmarks/maml_step.py``'s workload on a 2-core x86-64
CPU, one thread, 2026-11-28.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3

#: Blocks up to this size come from the heap rather than a fresh ``mmap`` (see the module
#: docstring for why 8 MiB and not glibc's maximum, 32 MiB).
MMAP_THRESHOLD = 8 * 2**20
#: Free memory at the top of the heap that is kept rather than returned to the system.
TRIM_THRESHOLD = 256 * 2**20
#: Extra memory requested whenever the heap grows, so it grows in few large steps.
TOP_PAD = 64 * 2**20

_tuned = False


def tune_cpu_allocator() -> bool:
    """Set glibc malloc's thresholds for meta-training on CPU; ``True`` if they are set.

    Calls ``mallopt`` for the mmap threshold (:data:`MMAP_THRESHOLD`), the trim threshold
    (:data:`TRIM_THRESHOLD`) and the top pad (:data:`TOP_PAD`) of this process (see the module
    docstring for why). Idempotent. Returns ``False`` and changes nothing where the C library is
    not glibc (macOS, Windows, musl): there the setting does not exist. Child processes started
    later with ``fork`` (DataLoader workers) inherit it.

    Setting the environment variables ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and
    ``MALLOC_TOP_PAD_`` before Python starts has the same effect for any program.

    Example:
        >>> from lightning_metakd.modules import tune_cpu_allocator
        >>> tune_cpu_allocator() in (True, False)
        True
    """
    global _tuned
    if _tuned:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = (
        (_M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (_M_TOP_PAD, TOP_PAD),
    )
    _tuned = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return _tuned


def configure_cpu_allocator(trainer: L.Trainer | None, tune: bool) -> None:
    """What the LightningModules' ``setup`` does: :func:`tune_cpu_allocator` for CPU runs.

    Only when ``tune`` and the trainer's root device is the CPU (on GPUs the activations live in
    CUDA's own caching allocator); says so once per process.
    """
    if not tune or trainer is None or trainer.strategy.root_device.type != "cpu" or _tuned:
        return
    if tune_cpu_allocator():
        rank_zero_info(
            "lightning-metakd: glibc malloc tuned for CPU meta-training (mmap threshold "
            f"{MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB): freed "
            "activations are reused instead of page-faulted in again (1.06-1.2x faster MAML "
            "steps). Pass tune_cpu_allocator=False to the module to keep malloc's defaults."
        )


__all__ = ["configure_cpu_allocator", "tune_cpu_allocator"]
