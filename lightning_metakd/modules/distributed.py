"""Process-group lifetime for the LightningModules (DDP on CPU and GPU alike)."""

from __future__ import annotations

import atexit

import torch.distributed as dist

_registered = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, if one is initialized then.

    Lightning registers this clean-up for NCCL only. A gloo group (DDP on CPU) that is still alive
    at interpreter finalization can abort the process with SIGABRT ("terminate called without an
    active exception") after all work has finished, so a finished ``metakd fit`` would exit with
    status -6. ``atexit`` handlers run while the interpreter is still whole, so destroying the group
    there is safe; calling this more than once registers one handler.
    """
    global _registered
    if _registered or not (dist.is_available() and dist.is_initialized()):
        return
    atexit.register(_destroy_if_initialized)
    _registered = True


def _destroy_if_initialized() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
