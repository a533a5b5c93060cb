"""The one functional inner loop: gradient-descent adaptation of a parameter dictionary.

MAML, first-order MAML, ANIL and Meta-SGD differ only in *which* parameters move, *how far* and
whether the outer gradient flows through the inner gradients; they all call :func:`inner_loop`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

Params = dict[str, Tensor]


def inner_loop(
    model: nn.Module,
    params: Mapping[str, Tensor],
    support_x: Tensor,
    support_y: Tensor,
    *,
    inner_lr: float | Mapping[str, Tensor],
    inner_steps: int,
    first_order: bool = False,
    adapt: Collection[str] | None = None,
) -> Params:
    """Adapt ``params`` to one task by gradient descent on its support set.

    Implements θ' = θ − α ∇θ L_task(f_θ(support_x), support_y), repeated ``inner_steps`` times
    (Finn et al. 2017, "Model-Agnostic Meta-Learning", eq. 1), with ``L_task`` the cross-entropy.

    The gradient is taken with :func:`torch.func.grad` on :func:`torch.func.functional_call`, so the
    function is pure: it runs in a Python loop over tasks and under :func:`torch.func.vmap`, and an
    outer ``loss.backward()`` differentiates through the inner gradients (the second-order
    meta-gradient of MAML). With ``first_order=True`` the inner gradients are treated as constants
    (first-order MAML, Finn et al. 2017 §5.2): the outer gradient then flows only through the
    ``θ`` term and, for Meta-SGD, into the learning rates.

    Args:
        model: the network; only its structure is used, its own parameters are ignored in favour
            of ``params``.
        params: ``{name: tensor}`` for the parameters of ``model`` (typically
            ``dict(model.named_parameters())``); names not in it fall back to the module's own.
        support_x: ``[N*K, C, H, W]`` support images of one task.
        support_y: ``[N*K]`` support labels in ``0..N-1``.
        inner_lr: the step size α: a float, or a per-parameter ``{name: tensor}`` of step sizes
            broadcastable to each parameter (Meta-SGD, Li et al. 2017). With a dict, every adapted
            parameter needs an entry.
        inner_steps: number of gradient steps (0 returns ``params`` unchanged).
        first_order: detach the inner gradients (FOMAML); saves the second-order graph.
        adapt: names of the parameters that change (ANIL: the ``head.*`` names); ``None`` adapts
            every entry of ``params``.

    Returns:
        A new ``{name: tensor}`` with the same keys as ``params``: adapted tensors for the names in
        ``adapt`` and the original tensors for the rest.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(4, 3)
        >>> params = dict(net.named_parameters())
        >>> fast = inner_loop(net, params, torch.randn(6, 4), torch.arange(3).repeat(2),
        ...                   inner_lr=0.1, inner_steps=2)
        >>> sorted(fast), fast["weight"].shape
        (['bias', 'weight'], torch.Size([3, 4]))
    """
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be non-negative, got {inner_steps}.")
    params = dict(params)
    names = list(params) if adapt is None else [n for n in params if n in set(adapt)]
    if adapt is not None:
        unknown = sorted(set(adapt) - set(params))
        if unknown:
            raise KeyError(
                f"adapt names parameters that are not in params: {unknown[:3]}; "
                f"available names include {sorted(params)[:5]}."
            )
    if isinstance(inner_lr, Mapping):
        missing = [n for n in names if n not in inner_lr]
        if missing:
            raise KeyError(
                f"inner_lr has no learning rate for {missing[:3]}; a per-parameter inner_lr must "
                "hold one entry per adapted parameter (see MetaSGD.build)."
            )
    if inner_steps == 0 or not names:
        return params

    fast = {n: params[n] for n in names}
    frozen = {n: t for n, t in params.items() if n not in fast}

    def support_loss(fast_params: Params) -> Tensor:
        # The inner loop runs in float32 even under autocast: fp16 inner gradients underflow and
        # bf16 ones lose most meta-gradient precision, while the support set is a small share of
        # the work (measurements in docs/scaling.md). Without autocast this changes nothing.
        with torch.autocast(support_x.device.type, enabled=False):
            logits = functional_call(model, {**frozen, **fast_params}, (support_x,))
        return F.cross_entropy(logits, support_y)

    support_grad = grad(support_loss)
    for _ in range(inner_steps):
        grads = support_grad(fast)
        if first_order:
            grads = {n: g.detach() for n, g in grads.items()}
        if isinstance(inner_lr, Mapping):
            fast = {n: p - inner_lr[n] * grads[n] for n, p in fast.items()}
        else:
            fast = {n: p - inner_lr * grads[n] for n, p in fast.items()}
    return {n: fast.get(n, t) for n, t in params.items()}


def check_logits(logits: Tensor, ways: int, model: nn.Module) -> Tensor:
    """Raise a clear error when a model's output does not have ``ways`` columns."""
    if logits.dim() != 2 or logits.shape[-1] != ways:
        raise ValueError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for a "
            f"{ways}-way task; MAML-family algorithms need a model with {ways} outputs, e.g. "
            f"Classifier(backbone, ways={ways})."
        )
    return logits


__all__ = ["Params", "inner_loop"]
