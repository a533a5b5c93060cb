"""bf16 mixed precision on CPU: meta-gradients stay close to fp32, and training still learns.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` convolutions and linear layers run in
bfloat16 (8-bit mantissa) while parameters, the inner-loop update θ − α∇ and the query loss stay in
float32. bf16 has float32's exponent range, so nothing in the inner loop underflows; the price is
precision. The support-set forward of the inner loop runs in float32 even under autocast (see
``inner_loop``), which is what keeps MAML's meta-gradient close: measured on this test's setting
(Conv4-32, 28x28, 5-way 1-shot, 3 queries, 4 tasks, seeds 0-9) the relative L2 error against fp32
is 0.021-0.042 for second-order MAML (0.19-0.36 before the inner loop was kept in float32) and
0.14-0.24 for ProtoNet, whose whole forward runs in bf16 — the size of a plain supervised
gradient's bf16 error on this network (~0.13). The tolerances leave about 2x margin; the MAML one
fails if the inner loop drops back to bf16. See docs/scaling.md for the policy.
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TinyDataModule

from lightning_metakd.algorithms import MAML, ProtoNet
from lightning_metakd.models import Conv4
from lightning_metakd.models.classifier import Classifier
from lightning_metakd.modules.meta_learner import MetaLearnerModule

MAX_RELATIVE_ERROR = {"maml": 0.1, "protonet": 0.5}  # measured max 0.042 and 0.24, seeds 0-9
MIN_COSINE = {"maml": 0.99, "protonet": 0.9}  # measured min 0.999 (MAML) and 0.971 (ProtoNet)
HIDDEN = 32  # the width of benchmarks/scale.py; narrower nets have larger bf16 errors


def meta_gradient(algorithm: str, seed: int, dtype: torch.dtype | None) -> torch.Tensor:
    """The flattened meta-gradient of one meta-batch, in fp32 or under CPU autocast to ``dtype``."""
    torch.manual_seed(seed)
    ways, tasks, size = 5, 4, 28
    if algorithm == "maml":
        algo, model = MAML(inner_lr=0.4, inner_steps=1), Classifier(Conv4(hidden=HIDDEN), ways)
    else:
        algo, model = ProtoNet(), Conv4(hidden=HIDDEN)
    templates = torch.rand(ways, 1, size, size)
    support_x = templates.repeat(tasks, 1, 1, 1, 1) + 0.5 * torch.randn(tasks, ways, 1, size, size)
    query_x = templates.repeat_interleave(3, 0).repeat(tasks, 1, 1, 1, 1)
    query_x = query_x + 0.5 * torch.randn_like(query_x)
    support_y = torch.arange(ways).expand(tasks, ways)
    query_y = torch.arange(ways).repeat_interleave(3).expand(tasks, -1)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = algo.episode_logits(
            model, dict(model.named_parameters()), support_x, support_y, query_x, ways,
            training=True, vmap_tasks=False,
        )  # fmt: skip
    if dtype is not None:
        assert logits.dtype == dtype  # autocast really ran the network in low precision
    F.cross_entropy(logits.flatten(0, 1).float(), query_y.flatten()).backward()
    # Conv biases directly before a BatchNorm have a true gradient of zero (the norm removes
    # them): their fp32 values are rounding noise, so they are left out of the comparison.
    return torch.cat(
        [
            p.grad.flatten()
            for n, p in model.named_parameters()
            if not (n.endswith(".0.bias") and "features" in n)
        ]
    )


@pytest.mark.parametrize("algorithm", ["maml", "protonet"])
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_meta_gradient_is_close_to_fp32(algorithm, seed):
    reference = meta_gradient(algorithm, seed, None)
    low = meta_gradient(algorithm, seed, torch.bfloat16)
    assert reference.dtype == low.dtype == torch.float32  # parameters and their grads stay fp32
    assert torch.isfinite(low).all()
    relative = ((low - reference).norm() / reference.norm()).item()
    cosine = F.cosine_similarity(low, reference, dim=0).item()
    assert relative < MAX_RELATIVE_ERROR[algorithm], relative
    assert cosine > MIN_COSINE[algorithm], cosine
    # bf16 really differs (the comparison is not of two fp32 runs).
    assert relative > 1e-3


@pytest.mark.slow
def test_bf16_mixed_training_learns(tmp_path):
    def trainer(**kwargs) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", devices=1, precision="bf16-mixed", max_epochs=2,
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, **kwargs,
        )  # fmt: skip

    data = TinyDataModule(
        ways=3, shots=1, queries=3, meta_batch_size=4, steps_per_epoch=10, val_episodes=8,
        test_episodes=12, image_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = MetaLearnerModule(
        Conv4(hidden=8, image_size=16),
        MAML(inner_lr=0.5, inner_steps=1),
        ways=3,
        optimizer=functools.partial(torch.optim.Adam, lr=5e-3),
    )
    before = trainer().test(model, data, verbose=False)[0]["test/acc"]
    fitted = trainer(limit_val_batches=0)  # validation is not what this test is about
    fitted.fit(model, data)
    after = fitted.test(model, data, verbose=False)[0]["test/acc"]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    assert after > max(before, 1 / 3) + 0.15, (before, after)


class _Trainer:
    """The one attribute configure_tf32 reads: the device the run uses."""

    def __init__(self, device: str) -> None:
        self.strategy = type("Strategy", (), {"root_device": torch.device(device)})()


@pytest.mark.parametrize(
    ("device", "algorithm", "allow", "expected"),
    [
        ("cuda", "maml", False, False),  # a second-order inner loop on a GPU: TF32 off
        ("cuda", "maml", True, True),  # the user keeps it
        ("cuda", "protonet", False, True),  # no inner loop: untouched
        ("cpu", "maml", False, True),  # CPU runs: untouched
    ],
)
def test_tf32_is_turned_off_for_gradient_based_inner_loops_on_cuda(
    device, algorithm, allow, expected
):
    from lightning_metakd.algorithms import MAML, ProtoNet
    from lightning_metakd.modules.precision import configure_tf32

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        algo = MAML(inner_lr=0.4, inner_steps=5) if algorithm == "maml" else ProtoNet()
        configure_tf32(_Trainer(device), algo, allow)
        assert torch.backends.cudnn.allow_tf32 is expected
        assert torch.backends.cuda.matmul.allow_tf32 is expected
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
