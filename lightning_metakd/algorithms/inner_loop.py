"""The one functional inner loop: gradient-descent adaptation of a parameter dictionary.

MAML, first-order MAML, ANIL and Meta-SGD differ only in *which* parameters move, *how far* and
whether the outer gradient flows through the inner gradients; they all call :func:`inner_loop`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
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
    checkpoint_steps: bool = False,
) -> Params:
    """Adapt ``params`` to one task by gradient descent on its support set.

    Implements θ' = θ − α ∇θ L_task(f_θ(support_x), support_y), repeated ``inner_steps`` times
    (Finn et al. 2017, "Model-Agnostic Meta-Learning", eq. 1), with ``L_task`` the cross-entropy.

    The network runs through :func:`torch.func.functional_call` on explicit parameters, so the
    function is pure (no module is cloned or changed): it runs in a Python loop over tasks and
    under :func:`torch.func.vmap`, and an outer ``loss.backward()`` differentiates through the
    inner gradients (the second-order meta-gradient of MAML). The inner gradient is
    :func:`torch.func.grad` under vmap and :func:`torch.autograd.grad` in the loop (same values;
    the transform's per-call cost made the loop 2-5% slower than learn2learn's). With
    ``first_order=True`` the inner gradients are treated as constants (first-order MAML, Finn et
    al. 2017 §5.2): the outer gradient then flows only through the ``θ`` term and, for Meta-SGD,
    into the learning rates.

    Gradient checkpointing (``checkpoint_steps=True``, second order only): a second-order step
    keeps the activations of its support forward *and* of its inner backward until the outer
    backward, so a task's graph grows by that much per step. Checkpointed, each step runs once
    without a graph and keeps only its inputs — the parameter-sized tensors θ_k (plus the
    Meta-SGD learning rates and the shared support set, which are not copied); the outer backward
    recomputes one step at a time, with its second-order graph, and differentiates it at once
    (:class:`_RecomputedStep`). Memory per task then grows by one parameter set per step instead
    of one step's activations; the cost is one extra support forward and inner gradient per step.
    The meta-gradients are the same (random ops such as dropout replay the forward's random
    numbers). It works with ``loss.backward()`` and with :func:`torch.autograd.grad` (the
    one-task-at-a-time training step), but not inside :func:`torch.func` transforms
    (``vmap``, ``grad``): there it raises ``ValueError``. With ``first_order`` there is nothing
    to save (the inner gradients are constants; the graph holds only parameter-sized tensors),
    so it is ignored.

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
        checkpoint_steps: recompute each inner step in the outer backward instead of storing its
            activations (see above): less memory, one extra forward and inner gradient per step.

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
    recompute = checkpoint_steps and not first_order
    if recompute:
        if torch._C._are_functorch_transforms_active():
            raise ValueError(
                "inner_loop(checkpoint_steps=True) cannot run inside torch.func.vmap or another "
                "torch.func transform: its recomputed steps are a custom autograd.Function "
                "without a vmap rule. Adapt tasks in a Python loop (MetaLearnerModule("
                "vmap_tasks=False); task_chunk_size then sets how many task graphs are alive), "
                "or keep vmap with checkpoint_steps=False and bound memory with task_chunk_size."
            )
        # The module's own parameters that params leaves out must be explicit inputs of each
        # recomputed step, or their share of the meta-gradient would be lost.
        frozen = {
            **{n: p for n, p in model.named_parameters() if n not in params},
            **frozen,
        }
    for _ in range(inner_steps):
        if recompute:
            fast = _recomputed_step(model, fast, frozen, support_x, support_y, inner_lr)
        else:
            fast = inner_step(model, fast, frozen, support_x, support_y, inner_lr, first_order)
    return {n: fast.get(n, t) for n, t in params.items()}


def inner_step(
    model: nn.Module,
    fast: Params,
    frozen: Params,
    support_x: Tensor,
    support_y: Tensor,
    inner_lr: float | Mapping[str, Tensor],
    first_order: bool = False,
) -> Params:
    """One step θ_{k+1} = θ_k − α ∇θ L_task(f_θ_k(support_x), support_y) of :func:`inner_loop`.

    ``fast`` holds the adapted parameters θ_k, ``frozen`` the rest of the model's parameters;
    returns θ_{k+1} with the keys of ``fast``.
    """

    def support_loss(fast_params: Params) -> Tensor:
        logits = functional_call(model, {**frozen, **fast_params}, (support_x,))
        return F.cross_entropy(logits, support_y)

    # The inner step runs in float32 even under autocast, its gradient included (so the graph the
    # meta-gradient flows back through is float32 too): fp16 inner gradients underflow and bf16
    # ones lose most meta-gradient precision, while the support set is a small share of the work
    # (measurements in docs/scaling.md). Without autocast this changes nothing.
    with torch.autocast(support_x.device.type, enabled=False):
        if torch._C._are_functorch_transforms_active() or torch.is_inference_mode_enabled():
            # Under vmap the transform's own gradient; in inference mode, where autograd
            # records nothing, torch.func.grad still differentiates.
            grads = grad(support_loss)(fast)
            if first_order:
                grads = {n: g.detach() for n, g in grads.items()}
        else:
            grads = _support_gradients(support_loss, fast, create_graph=not first_order)
    if isinstance(inner_lr, Mapping):
        return {n: p - inner_lr[n] * grads[n] for n, p in fast.items()}
    return {n: p - inner_lr * grads[n] for n, p in fast.items()}


def _support_gradients(
    support_loss: Callable[[Params], Tensor], fast: Params, create_graph: bool
) -> Params:
    """∇ of ``support_loss`` at ``fast`` with :func:`torch.autograd.grad`, outside torch.func.

    The same values as ``torch.func.grad(support_loss)(fast)``, whose transform costs about
    1.3 ms per call on CPU (wrapping and unwrapping every parameter): 2-5% of a Conv4-64 MAML step
    at 1-5 inner steps (``benchmarks/maml_step.py``). So the loop over tasks takes gradients here
    and only vmap, which needs the transform, uses :func:`torch.func.grad`. The gradient's graph
    is kept (second order) only when ``create_graph`` and grad mode are on; parameters that do not
    reach the loss get zeros, as with :func:`torch.func.grad`.
    """
    create_graph = create_graph and torch.is_grad_enabled()
    with torch.enable_grad():
        inputs = {n: p if p.requires_grad else p.detach().requires_grad_() for n, p in fast.items()}
        gradients = torch.autograd.grad(
            support_loss(inputs),
            list(inputs.values()),
            create_graph=create_graph,
            allow_unused=True,
            materialize_grads=True,
        )
    return dict(zip(inputs, gradients, strict=True))


def _recomputed_step(
    model: nn.Module,
    fast: Params,
    frozen: Params,
    support_x: Tensor,
    support_y: Tensor,
    inner_lr: float | Mapping[str, Tensor],
) -> Params:
    """:func:`inner_step` (second order) through :class:`_RecomputedStep`: stores inputs only."""
    fast_names, frozen_names = list(fast), list(frozen)
    lr_names = fast_names if isinstance(inner_lr, Mapping) else []
    inputs = (
        *fast.values(),
        *frozen.values(),
        *(inner_lr[n] for n in lr_names),  # type: ignore[index]
        support_x,
    )
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs)):
        return inner_step(model, fast, frozen, support_x, support_y, inner_lr)
    a, b, c = len(fast_names), len(frozen_names), len(lr_names)

    def run(*tensors: Tensor) -> tuple[Tensor, ...]:
        lrs = dict(zip(lr_names, tensors[a + b : a + b + c], strict=True)) if c else inner_lr
        out = inner_step(
            model,
            dict(zip(fast_names, tensors[:a], strict=True)),
            dict(zip(frozen_names, tensors[a : a + b], strict=True)),
            tensors[-1],
            support_y,
            lrs,  # type: ignore[arg-type]
        )
        return tuple(out[n] for n in fast_names)

    return dict(zip(fast_names, _RecomputedStep.apply(run, *inputs), strict=True))


class _RecomputedStep(torch.autograd.Function):
    """One inner step that stores its inputs, not its activations, and recomputes in backward.

    ``forward(ctx, run, *inputs)`` evaluates ``run(*inputs)`` (a tuple of tensors) without a
    graph and saves only ``inputs`` and the random-number state. ``backward`` replays ``run`` on
    detached copies of the inputs with grad enabled — building that step's second-order graph,
    as :func:`torch.func.grad` does whenever its inputs require grad — and returns
    ``torch.autograd.grad(outputs, inputs, grad_outputs)``. Gradients go back through the
    autograd engine's return values rather than into ``.grad``, so unlike reentrant
    ``torch.utils.checkpoint`` this works under :func:`torch.autograd.grad`, and unlike the
    non-reentrant one it installs no saved-tensor hooks, which :func:`torch.func.grad` rejects.
    """

    @staticmethod
    def forward(ctx: Any, run: Callable[..., tuple[Tensor, ...]], *inputs: Tensor) -> Any:
        ctx.run = run
        ctx.device = inputs[-1].device
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return run(*inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, ...]:
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        cuda = [ctx.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            torch.set_rng_state(ctx.cpu_rng)
            if cuda:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            outputs = ctx.run(*inputs)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
        wanted = [i for i, t in enumerate(inputs) if t.requires_grad]
        grads = torch.autograd.grad(
            [o for o, _ in pairs],
            [inputs[i] for i in wanted],
            [g for _, g in pairs],
            allow_unused=True,
        )
        result: list[Tensor | None] = [None] * len(inputs)
        for i, g in zip(wanted, grads, strict=True):
            result[i] = g
        return (None, *result)


def check_logits(logits: Tensor, ways: int, model: nn.Module) -> Tensor:
    """Raise a clear error when a model's output does not have ``ways`` columns."""
    if logits.dim() != 2 or logits.shape[-1] != ways:
        raise ValueError(
            f"{type(model).__name__} returned logits of shape {tuple(logits.shape)} for a "
            f"{ways}-way task; MAML-family algorithms need a model with {ways} outputs, e.g. "
            f"Classifier(backbone, ways={ways})."
        )
    return logits


__all__ = ["Params", "inner_loop", "inner_step"]
