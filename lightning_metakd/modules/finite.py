"""Stop a run whose training loss is no longer finite, naming the step and the loss term."""

from __future__ import annotations

from collections.abc import Mapping

import lightning as L
import torch
from torch import Tensor

#: What to try when a loss diverges; part of every :class:`NonFiniteLossError` message.
ADVICE = (
    "Try a lower learning rate (the optimizer's lr, or the algorithm's inner_lr), "
    "trainer.precision=32-true instead of bf16/16-mixed, or gradient clipping "
    "(trainer.gradient_clip_val=1.0)."
)


class NonFiniteLossError(RuntimeError):
    """The training loss, or one of its terms, is NaN or infinite; the run stops at that step.

    Raised from ``training_step`` before ``backward``, so that step never updates the parameters and
    every checkpoint written so far holds the parameters of finite steps. Attributes: ``step`` (the
    trainer's global step), ``batch_idx`` and ``terms`` (the non-finite values by logged name,
    e.g. ``{"train/loss": nan, "train/loss_soft": nan}``).
    """

    def __init__(self, step: int, batch_idx: int, terms: dict[str, float]) -> None:
        self.step, self.batch_idx, self.terms = step, batch_idx, terms
        if terms:
            what = ", ".join(f"{name}={value}" for name, value in terms.items())
        else:  # this process is fine; another DDP process is not
            what = "on another process (every process stops at the same step)"
        super().__init__(
            f"The training loss is not finite at global step {step} (batch_idx {batch_idx}): "
            f"{what}. The run stops before this step's update, so the checkpoints written so far "
            f"hold finite parameters; resume from the last one after a change. {ADVICE}"
        )


def check_finite_loss(
    module: L.LightningModule,
    batch_idx: int,
    loss: Tensor,
    terms: Mapping[str, Tensor] | None = None,
) -> None:
    """Raise :class:`NonFiniteLossError` unless ``loss`` and each of its ``terms`` are finite.

    Call it at the end of ``training_step``, before Lightning's ``backward`` and optimizer step.
    ``loss`` is the scalar objective, logged as ``train/loss``; ``terms`` its named scalar parts,
    logged as ``train/loss_<name>`` (:class:`~lightning_metakd.modules.DistillationLoss` terms).
    One device synchronisation per call. Under DDP the processes decide together (one boolean
    all-reduce), so all of them stop at the same step instead of the finite ones waiting forever
    in the next collective.

    Example:
        >>> module = L.LightningModule()
        >>> check_finite_loss(module, 0, torch.tensor(1.0), {"soft": torch.tensor(0.5)})
        >>> try:
        ...     check_finite_loss(module, 3, torch.tensor(float("inf")))
        ... except NonFiniteLossError as err:
        ...     print(err.step, err.batch_idx, err.terms)
        0 3 {'train/loss': inf}
    """
    named = {"train/loss": loss, **{f"train/loss_{k}": v for k, v in (terms or {}).items()}}
    finite = torch.stack([torch.isfinite(v.detach()).all() for v in named.values()]).tolist()
    trainer = module._trainer  # None outside a Trainer: decide alone
    ok = all(finite) if trainer is None else trainer.strategy.reduce_boolean_decision(all(finite))
    if ok:
        return
    bad = {n: v.item() for (n, v), f in zip(named.items(), finite, strict=True) if not f}
    raise NonFiniteLossError(module.global_step, batch_idx, bad)


__all__ = ["ADVICE", "NonFiniteLossError", "check_finite_loss"]
