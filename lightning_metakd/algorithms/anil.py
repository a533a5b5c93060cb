"""ANIL: almost no inner loop (Raghu et al. 2020)."""

from __future__ import annotations

from collections.abc import Collection

from lightning_metakd.algorithms.inner_loop import Params
from lightning_metakd.algorithms.maml import MAML


class ANIL(MAML):
    """Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, ICLR 2020).

    MAML whose inner loop adapts only the classifier head, θ'_head = θ_head − α ∇ L_T (the MAML
    update, Finn et al. 2017 eq. 1, restricted to the head); the backbone is meta-learned by the
    outer loop alone. Raghu et al. show that this matches MAML's accuracy, because MAML's success
    comes from feature reuse rather than rapid learning in the body.

    The model is a :class:`~lightning_metakd.models.classifier.Classifier` (parameters
    ``backbone.*`` and ``head.*``); the names that start with ``head_prefix`` are adapted.

    Args:
        inner_lr, inner_steps, inner_steps_test, first_order, checkpoint_steps: as for
            :class:`MAML` (same defaults; Raghu et al. keep MAML's hyperparameters). With
            ``checkpoint_steps`` each recomputed step also takes the backbone's parameters as
            inputs (not copied), so they still receive their second-order meta-gradient.
        head_prefix: prefix of the adapted parameter names.

    Example:
        >>> anil = ANIL(inner_lr=0.1, inner_steps=5)
        >>> sorted(anil.adapted_names({"backbone.w": None, "head.weight": None, "head.bias": None}))
        ['head.bias', 'head.weight']
    """

    def __init__(
        self,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        inner_steps_test: int | None = None,
        first_order: bool = False,
        head_prefix: str = "head.",
        checkpoint_steps: bool = False,
    ) -> None:
        super().__init__(inner_lr, inner_steps, inner_steps_test, first_order, checkpoint_steps)
        self.head_prefix = head_prefix

    def adapted_names(self, params: Params) -> Collection[str]:
        names = [n for n in params if n.startswith(self.head_prefix)]
        if not names:
            raise ValueError(
                f"ANIL adapts the parameters named {self.head_prefix!r}*, but the model has none "
                f"(names start with {sorted({n.split('.')[0] for n in params})}). Wrap the "
                "backbone in Classifier(backbone, ways) or set head_prefix."
            )
        return names


__all__ = ["ANIL"]
