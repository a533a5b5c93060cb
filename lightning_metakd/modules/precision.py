"""TF32 on CUDA: off for meta-learners whose meta-gradient flows through an inner loop."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_metakd.algorithms import MetaAlgorithm


def configure_tf32(trainer: L.Trainer | None, algorithm: MetaAlgorithm, allow_tf32: bool) -> None:
    """Turn TF32 off for CUDA runs of a gradient-based inner loop, unless ``allow_tf32``.

    On Ampere and newer GPUs PyTorch runs float32 convolutions in TF32 (10-bit mantissa) by
    default. A MAML meta-gradient differentiates through the inner gradients, and on an H200 TF32
    made 5-step second-order MAML meta-gradients 0.33-0.91 off in relative norm (cosine down to
    0.72) against float64, against about 1e-4 with TF32 off (``benchmarks/gpu_check.py``,
    docs/scaling.md). So for an algorithm with inner steps on a CUDA device this sets
    ``torch.backends.cudnn.allow_tf32`` and ``torch.backends.cuda.matmul.allow_tf32`` to
    ``False`` for the process (and says so once). ProtoNet and MatchingNet, and CPU runs, are left
    as they are. ``allow_tf32=True`` keeps PyTorch's settings: faster, less exact.
    """
    if allow_tf32 or trainer is None or algorithm.steps(True) == 0:
        return
    if trainer.strategy.root_device.type != "cuda":
        return
    if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        rank_zero_info(
            "lightning-metakd: TF32 turned off for this process (cudnn and matmul): second-order "
            f"meta-gradients of {type(algorithm).__name__} lose most of their precision in TF32. "
            "Pass allow_tf32=True to the module to keep it."
        )
