"""GPU checks: meta-gradient precision, mixed-precision training, and every Kanji config under DDP.

Three parts, each runnable alone (``--parts``); each writes one JSON file into ``--out`` and prints
a Markdown table (all tables are also collected in ``--out/gpu_check_<parts>.md``):

- ``precision`` (gpu_precision.json): the meta-gradient of one meta-batch — second-order MAML
  (Conv4-64 with a 5-way head, 5 inner steps of 0.4) and ProtoNet (Conv4-64), 5-way 1-shot,
  15 queries per class, 28x28, 8 tasks, on both task paths (``vmap``, the GPU default, and the
  task ``loop``) — in each mode of :data:`MODES` (fp32 with and without TF32 convolutions, bf16
  and fp16 autocast, fp16 with a GradScaler-like dynamic loss scale, and a variant that runs the
  whole inner gradient in fp32), each compared with a float64 reference of the same seed:
  relative L2 error, cosine, and the dtypes the convolutions produced. The library's precision
  policy runs the inner loop's support forward in float32 under autocast
  (``algorithms/inner_loop.py``); the part also records every inner gradient ∇θ L_support that
  the inner loop computes (MAML, task loop, all tasks and steps) and counts its exactly-zero
  entries whose float64 counterpart is non-zero (silent underflow), for the library in each mode
  and for a counterfactual inner step whose support forward runs in fp16.
- ``fit`` (gpu_fit.json): a Lightning ``Trainer`` fits MAML (Conv4-64, 5 inner steps) and
  ProtoNet (Conv4-64) for ``--fit-steps`` steps on 5-way 1-shot KanjiVG episodes under
  ``32-true``, ``bf16-mixed`` and ``16-mixed``: training loss of the first and last 5 steps,
  test accuracy on 50 episodes, time, and the final GradScaler scale under ``16-mixed``.
- ``configs`` (gpu_configs.json): every LightningCLI config under ``configs/kanji/`` runs
  ``metakd fit`` then ``metakd test --ckpt_path best.ckpt`` with ``--trainer.strategy ddp
  --trainer.devices 1 --trainer.precision bf16-mixed`` and tiny limits (3 training and 2
  validation batches, 1 epoch, 2 test batches). The distillation configs read the teacher
  checkpoints written by the first wave of the same run. ``pipeline.yaml`` and
  ``finetune.yaml`` are not LightningCLI configs and are skipped.

Usage::

    python benchmarks/gpu_check.py --device cuda --out benchmarks/results
    python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check   # smoke run

The KanjiVG parts read the rendered cache (``$XDG_CACHE_HOME/lightning_metakd``); it is rendered
first if missing (about 2 minutes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
#: name: (autocast dtype or None, dynamic loss scale, whole inner gradient in fp32, TF32 on).
#: TF32 on is PyTorch's default for cuDNN convolutions (``torch.backends.cudnn.allow_tf32``).
MODES = {
    "fp32": (None, False, False, True),
    "fp32-no-tf32": (None, False, False, False),
    "bf16": (torch.bfloat16, False, False, True),
    "fp16": (torch.float16, False, False, True),
    "fp16-scaled": (torch.float16, True, False, True),
    "bf16-no-tf32": (torch.bfloat16, False, False, False),
    "fp16-no-tf32": (torch.float16, False, False, False),
    "bf16-inner-grad-fp32-no-tf32": (torch.bfloat16, False, True, False),
    "fp16-inner-grad-fp32-no-tf32": (torch.float16, False, True, False),
}
LOSS_SCALE = 2.0**16  # torch.amp.GradScaler's initial scale


# -- precision ---------------------------------------------------------------------------------
def make_episode(seed: int, ways: int, shots: int, queries: int, tasks: int, size: int):
    """Learnable synthetic tasks (one noisy template per class), float64 on CPU."""
    g = torch.Generator().manual_seed(1000 + seed)
    templates = torch.rand(ways, 1, size, size, generator=g, dtype=torch.float64)

    def draw(per_class: int) -> torch.Tensor:
        x = templates.repeat_interleave(per_class, 0).repeat(tasks, 1, 1, 1, 1)
        return x + 0.5 * torch.randn(x.shape, generator=g, dtype=torch.float64)

    support_y = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    query_y = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return draw(shots), support_y, draw(queries), query_y


def build(algorithm: str, seed: int, hidden: int, inner_steps: int, ways: int):
    """(algorithm, model) with the weights of ``seed``."""
    from lightning_metakd.algorithms import MAML, ProtoNet
    from lightning_metakd.models import Conv4
    from lightning_metakd.models.classifier import Classifier

    torch.manual_seed(seed)
    if algorithm == "maml":
        return MAML(inner_lr=0.4, inner_steps=inner_steps), Classifier(Conv4(hidden=hidden), ways)
    return ProtoNet(), Conv4(hidden=hidden)


def compared(name: str) -> bool:
    """Conv biases directly before a BatchNorm have a true gradient of zero: left out."""
    return not (name.endswith(".0.bias") and "features" in name)


def meta_gradient(
    algorithm: str,
    seed: int,
    mode: str,
    device: torch.device,
    cfg: dict,
    vmap_tasks: bool | None = None,
) -> tuple[torch.Tensor, float, set[str]]:
    """The flattened float64 meta-gradient of one meta-batch in ``mode`` (or ``"fp64"``).

    Returns the gradient, the loss scale it was taken with and the dtypes the convolutions'
    outputs had (autocast has no effect inside ``torch.func.vmap``: there they stay float32): ``fp16-scaled`` starts at 2**16
    and halves the scale until the gradient is finite, as ``GradScaler`` does by skipping steps.
    ``*-inner-grad-fp32`` modes run the whole inner gradient (its backward too, not only the
    support forward) with autocast off: a variant of the library's policy, patched in here.
    """
    low, dynamic, inner_fp32, tf32_on = MODES.get(mode, (None, False, False, False))
    algo, model = build(algorithm, seed, cfg["hidden"], cfg["inner_steps"], cfg["ways"])
    dtype = torch.float64 if mode == "fp64" else torch.float32
    model = model.to(device, dtype)
    sx, sy, qx, qy = (
        t.to(device, dtype) if t.is_floating_point() else t.to(device)
        for t in make_episode(
            seed, cfg["ways"], cfg["shots"], cfg["queries"], cfg["tasks"], cfg["size"]
        )
    )
    inner_module = importlib.import_module("lightning_metakd.algorithms.inner_loop")
    original_grad, tf32 = inner_module.grad, torch.backends.cudnn.allow_tf32

    def fp32_grad(fn: Callable, *args, **kwargs) -> Callable:
        inner = original_grad(fn, *args, **kwargs)

        def wrapped(*a, **k):
            with torch.autocast(device.type, enabled=False):
                return inner(*a, **k)

        return wrapped

    conv_dtypes: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: conv_dtypes.add(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    scale = LOSS_SCALE if dynamic else 1.0
    while True:
        model.zero_grad(set_to_none=True)
        torch.backends.cudnn.allow_tf32 = tf32_on
        if inner_fp32:
            inner_module.grad = fp32_grad
        try:
            with torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=low is not None):
                logits = algo.episode_logits(
                    model, dict(model.named_parameters()), sx, sy, qx, cfg["ways"],
                    training=True, vmap_tasks=vmap_tasks,
                )  # fmt: skip
            loss = F.cross_entropy(logits.flatten(0, 1).to(dtype), qy.flatten())
            (loss * scale).backward()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
            inner_module.grad = original_grad
        flat = torch.cat(
            [p.grad.flatten().double() / scale for n, p in model.named_parameters() if compared(n)]
        )
        if not dynamic or bool(torch.isfinite(flat).all()) or scale < 1:
            for hook in hooks:
                hook.remove()
            return flat, scale, {str(d).replace("torch.", "") for d in conv_dtypes}
        scale /= 2


def inner_gradients(
    seed: int, mode: str, device: torch.device, cfg: dict
) -> list[dict[str, torch.Tensor]]:
    """Every inner gradient ∇θ L_support of MAML's inner loop (task loop, all steps), float64.

    ``mode``: ``fp64``, a key of :data:`MODES` (the library as it runs in that mode) or
    ``fp16-support-no-tf32`` (a counterfactual copy of the inner step whose support forward runs
    under fp16 autocast, i.e. without the library's policy; TF32 off).
    """
    # The package exports the function ``inner_loop``, which hides the submodule's attribute.
    inner_module = importlib.import_module("lightning_metakd.algorithms.inner_loop")
    captured: list[dict[str, torch.Tensor]] = []
    original = inner_module.grad

    def recording_grad(fn: Callable, *args, **kwargs) -> Callable:
        inner = original(fn, *args, **kwargs)

        def wrapped(*a, **k):
            out = inner(*a, **k)
            captured.append({n: g.detach().double() for n, g in out.items()})
            return out

        return wrapped

    if mode == "fp16-support-no-tf32":
        algo, model = build("maml", seed, cfg["hidden"], cfg["inner_steps"], cfg["ways"])
        model = model.to(device)
        sx, sy, _, _ = make_episode(
            seed, cfg["ways"], cfg["shots"], cfg["queries"], cfg["tasks"], cfg["size"]
        )
        sx, sy = sx.to(device, torch.float32), sy.to(device)
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        with torch.autocast(device.type, dtype=torch.float16):
            for task in range(cfg["tasks"]):
                fast = dict(model.named_parameters())
                for _ in range(cfg["inner_steps"]):

                    def support_loss(p, x=sx[task], y=sy[task]):
                        logits = torch.func.functional_call(model, p, (x,))
                        return F.cross_entropy(logits.float(), y)

                    grads = torch.func.grad(support_loss)(fast)
                    captured.append({n: g.detach().double() for n, g in grads.items()})
                    fast = {n: p - 0.4 * grads[n] for n, p in fast.items()}
        torch.backends.cudnn.allow_tf32 = tf32
        return captured
    inner_module.grad = recording_grad
    try:
        meta_gradient("maml", seed, mode, device, cfg, False)
    finally:
        inner_module.grad = original
    return captured


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def precision_part(device: torch.device, seeds: int, cfg: dict) -> dict:
    """Meta-gradient errors against float64 and inner-gradient underflow counts.

    A mode that raises is recorded with its error; the others go on.
    """
    rows = []
    for algorithm, path in [(a, p) for a in ("maml", "protonet") for p in ("vmap", "loop")]:
        results: dict[str, dict] = {
            m: {"errors": [], "cosines": [], "scales": [], "finite": True, "dtypes": set()}
            for m in MODES
        }
        failed: dict[str, str] = {}
        vmap = path == "vmap"
        for seed in range(seeds):
            reference, _, _ = meta_gradient(algorithm, seed, "fp64", device, cfg, vmap)
            for mode in MODES:
                if mode in failed:
                    continue
                try:
                    low, scale, dtypes = meta_gradient(algorithm, seed, mode, device, cfg, vmap)
                except Exception as err:  # noqa: BLE001 - record and go on
                    failed[mode] = f"{type(err).__name__}: {err}"[-1000:]
                    continue
                r = results[mode]
                r["dtypes"] |= dtypes
                r["scales"].append(scale)
                r["finite"] &= bool(torch.isfinite(low).all())
                r["errors"].append(((low - reference).norm() / reference.norm()).item())
                r["cosines"].append(F.cosine_similarity(low, reference, dim=0).item())
        for mode, r in results.items():
            if mode in failed:
                rows.append(
                    {"algorithm": algorithm, "path": path, "mode": mode, "error": failed[mode]}
                )
                continue
            rows.append(
                {
                    "algorithm": algorithm,
                    "path": path,
                    "mode": mode,
                    "conv_dtypes": sorted(r["dtypes"]),
                    "relative_error": summary(r["errors"]),
                    "cosine_min": min(r["cosines"]),
                    "finite": r["finite"],
                    "loss_scales": r["scales"],
                    "per_seed": r["errors"],
                }
            )
        print(f"precision: {algorithm} {path} done", file=sys.stderr, flush=True)

    underflow = []
    references = {seed: inner_gradients(seed, "fp64", device, cfg) for seed in range(seeds)}
    for mode in (
        "fp32",
        "fp32-no-tf32",
        "bf16-no-tf32",
        "fp16-no-tf32",
        "fp16-inner-grad-fp32-no-tf32",
        "fp16-support-no-tf32",
    ):
        zero = nonzero_ref = entries = tiny = count = 0
        rel = []
        try:
            for seed in range(seeds):
                got = inner_gradients(seed, mode, device, cfg)
                for r, g in zip(references[seed], got, strict=True):
                    count += 1
                    for n in r:
                        if not compared(n):
                            continue
                        mask = r[n] != 0
                        nonzero_ref += int(mask.sum())
                        zero += int(((g[n] == 0) & mask).sum())
                        entries += r[n].numel()
                        tiny += int(((r[n].abs() < 2.0**-24) & mask).sum())
                    ref_flat = torch.cat([r[n].flatten() for n in r if compared(n)])
                    got_flat = torch.cat([g[n].flatten() for n in g if compared(n)])
                    rel.append(((got_flat - ref_flat).norm() / ref_flat.norm()).item())
        except Exception as err:  # noqa: BLE001 - record and go on
            underflow.append({"mode": mode, "error": f"{type(err).__name__}: {err}"[-1000:]})
            continue
        underflow.append(
            {
                "mode": mode,
                "inner_gradients": count,
                "entries": entries,
                "nonzero_in_fp64": nonzero_ref,
                "zero_where_fp64_nonzero": zero,
                "zero_fraction": zero / max(nonzero_ref, 1),
                "fp64_below_2^-24_fraction": tiny / max(nonzero_ref, 1),
                "relative_error_vs_fp64": summary(rel),
            }
        )
    return {"setting": cfg, "seeds": seeds, "meta_gradient": rows, "inner_gradient": underflow}


def precision_tables(result: dict) -> str:
    lines = [
        "| algorithm | tasks | precision | conv outputs | rel. L2 error vs fp64: min / median / max "
        "| min cosine | finite | loss scale |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["meta_gradient"]:
        if "error" in r:
            lines.append(
                f"| {r['algorithm']} | {r['path']} | {r['mode']} | failed: {r['error'][:150]} |"
            )
            continue
        e = r["relative_error"]
        scales = sorted(set(r["loss_scales"]))
        scale = "1" if scales == [1.0] else ", ".join(f"2^{math.log2(v):.0f}" for v in scales)
        lines.append(
            f"| {r['algorithm']} | {r['path']} | {r['mode']} | {', '.join(r['conv_dtypes'])} | "
            f"{e['min']:.2e} / {e['median']:.2e} / "
            f"{e['max']:.2e} | {r['cosine_min']:.5f} | {r['finite']} | {scale} |"
        )
    lines += [
        "",
        "| inner loop (MAML, task loop, all tasks and steps) | inner gradients | entries non-zero in fp64 "
        "| exactly zero there | fraction | fp64 entries below 2^-24 | rel. error vs fp64 (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["inner_gradient"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | failed: {r['error'][:150]} |")
            continue
        lines.append(
            f"| {r['mode']} | {r['inner_gradients']} | {r['nonzero_in_fp64']} | "
            f"{r['zero_where_fp64_nonzero']} | {r['zero_fraction']:.2e} | "
            f"{r['fp64_below_2^-24_fraction']:.2e} | "
            f"{r['relative_error_vs_fp64']['median']:.2e} |"
        )
    return "\n".join(lines)


# -- fit ---------------------------------------------------------------------------------------
def fit_part(accelerator: str, steps: int, precisions: list[str], quick: bool) -> dict:
    """Fit MAML and ProtoNet for ``steps`` steps per precision; losses and test accuracy."""
    import lightning as L

    from lightning_metakd.algorithms import MAML, ProtoNet
    from lightning_metakd.data import KanjiDataModule
    from lightning_metakd.models import Conv4
    from lightning_metakd.modules import MetaLearnerModule

    class Losses(L.Callback):
        def __init__(self) -> None:
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.values.append(float(loss))

    hidden = 8 if quick else 64
    rows = []
    for algorithm in ("maml", "protonet"):
        for precision in precisions:
            L.seed_everything(0, workers=True)
            algo = MAML(inner_lr=0.4, inner_steps=5) if algorithm == "maml" else ProtoNet()
            module = MetaLearnerModule(Conv4(1, hidden, image_size=28), algo, ways=5)
            data = KanjiDataModule(
                ways=5, shots=1, queries=5, meta_batch_size=8, steps_per_epoch=steps,
                val_episodes=2, test_episodes=8 if quick else 50, test_queries=15,
                grouping="radical", num_workers=0,
            )  # fmt: skip
            losses = Losses()
            trainer = L.Trainer(
                accelerator=accelerator, devices=1, precision=precision, max_epochs=1,
                limit_val_batches=0, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, callbacks=[losses],
                default_root_dir="/tmp/gpu_check_fit",
            )  # fmt: skip
            start = time.perf_counter()
            try:
                trainer.fit(module, data)
                seconds = time.perf_counter() - start
                test = trainer.test(module, data, verbose=False)[0]
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                head, tail = losses.values[:5], losses.values[-5:]
                rows.append(
                    {
                        "algorithm": algorithm,
                        "precision": precision,
                        "ok": True,
                        "trainer_precision": trainer.precision,
                        "steps": len(losses.values),
                        "loss_first5": statistics.mean(head),
                        "loss_last5": statistics.mean(tail),
                        "loss_dropped": statistics.mean(tail) < statistics.mean(head),
                        "all_finite": all(v == v and abs(v) != float("inf") for v in losses.values),
                        "test_acc": test["test/acc"],
                        "fit_seconds": seconds,
                        "steps_per_s": len(losses.values) / seconds,
                        "grad_scale": scaler.get_scale() if scaler is not None else None,
                        "losses": losses.values,
                    }
                )
            except Exception as err:  # noqa: BLE001 - record and go on with the others
                rows.append(
                    {"algorithm": algorithm, "precision": precision, "ok": False,
                     "error": f"{type(err).__name__}: {err}"[-2000:]}
                )  # fmt: skip
            r = rows[-1]
            print(f"fit: {algorithm} {precision}: {r.get('ok')}", file=sys.stderr, flush=True)
    return {"hidden": hidden, "steps": steps, "runs": rows}


def fit_table(result: dict) -> str:
    lines = [
        "| algorithm | precision | steps | train loss, first 5 → last 5 | dropped | test acc "
        "(5-way 1-shot) | steps/s (incl. first-step warm-up) | final GradScaler scale |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        if not r["ok"]:
            lines.append(f"| {r['algorithm']} | {r['precision']} | failed: {r['error'][:120]} |")
            continue
        scale = f"{r['grad_scale']:.0f}" if r["grad_scale"] is not None else "-"
        lines.append(
            f"| {r['algorithm']} | {r['precision']} | {r['steps']} | {r['loss_first5']:.3f} → "
            f"{r['loss_last5']:.3f} | {r['loss_dropped']} | {r['test_acc']:.3f} | "
            f"{r['steps_per_s']:.1f} | {scale} |"
        )
    return "\n".join(lines)


# -- configs -----------------------------------------------------------------------------------
#: (config, logger name, teachers: {init arg: [config names whose best.ckpt it reads]})
WAVE_1 = (
    "maml.yaml",
    "protonet.yaml",
    "protonet_conv4_16.yaml",
    "resnet12_protonet.yaml",
    "vit_teacher.yaml",
    "quickstart/teacher.yaml",
    "quickstart/student_baseline.yaml",
)
WAVE_2 = {
    "distill_protonet.yaml": ["protonet.yaml"],
    "distill_two_teachers.yaml": ["protonet.yaml", "maml.yaml"],
    "distill_vit_attention.yaml": ["vit_teacher.yaml"],
    "quickstart/distill.yaml": ["quickstart/teacher.yaml"],
}
SKIPPED = {
    "pipeline.yaml": "not a LightningCLI config (metakd pipeline)",
    "finetune.yaml": "not a LightningCLI config (metakd finetune)",
}


def logger_name(config: Path) -> str:
    match = re.search(r"name:\s*([\w-]+)", config.read_text().split("logger:")[-1])
    if not match:
        raise ValueError(f"{config} has no logger name")
    return match.group(1)


def run_config(
    name: str, runs: Path, trainer_args: list[str], teachers: list[Path], port: int, timeout: int
) -> dict:
    """``metakd fit`` then ``metakd test --ckpt_path best.ckpt`` of one config."""
    config = REPO / "configs" / "kanji" / name
    common = ["--config", str(config), *trainer_args]
    common += ["--trainer.logger.init_args.save_dir", str(runs)]
    if teachers:
        value = str(teachers[0]) if len(teachers) == 1 else json.dumps([str(t) for t in teachers])
        common += ["--model.init_args.teacher", value]
    best = runs / logger_name(config) / "version_0" / "checkpoints" / "best.ckpt"
    env = {**os.environ, "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    result: dict = {"config": name, "best": str(best)}
    for stage, extra in (
        ("fit", []),
        ("test", ["--trainer.limit_test_batches", "2", "--ckpt_path", str(best)]),
    ):
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "lightning_metakd.cli", stage, *common, *extra],
                capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO,
            )  # fmt: skip
            rc, out = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as err:
            rc, out = -1, f"timeout after {timeout} s\n{err.stdout or ''}{err.stderr or ''}"
        result[f"{stage}_seconds"] = time.perf_counter() - start
        result[f"{stage}_rc"] = rc
        if stage == "fit" and rc == 0 and not best.exists():
            rc, out = 1, out + f"\nno best checkpoint at {best}"
            result["fit_rc"] = rc
        if rc != 0:
            result["ok"] = False
            result["failed_stage"] = stage
            result["error_tail"] = out[-3000:]
            return result
        if stage == "test":
            acc = re.search(r"test/acc\b[\s│┃|]*([0-9][0-9.eE+-]*)", out)
            result["test_acc"] = float(acc.group(1)) if acc else None
    result["ok"] = True
    return result


def configs_part(
    accelerator: str, precision: str, runs: Path, jobs: int, timeout: int, only: list[str] | None
) -> dict:
    trainer_args = [
        "--trainer.accelerator", accelerator, "--trainer.devices", "1",
        "--trainer.strategy", "ddp", "--trainer.precision", precision,
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
        "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    listed = sorted(
        str(p.relative_to(REPO / "configs" / "kanji"))
        for p in (REPO / "configs" / "kanji").rglob("*.yaml")
    )
    unknown = set(listed) - set(WAVE_1) - set(WAVE_2) - set(SKIPPED)
    results: dict[str, dict] = {
        name: {"config": name, "ok": None, "skipped": why} for name, why in SKIPPED.items()
    }
    for name in sorted(unknown):  # a new config: run it in the first wave
        print(f"configs: {name} is new here; running it in wave 1", file=sys.stderr)
    wave1 = [n for n in (*WAVE_1, *sorted(unknown)) if only is None or n in only]
    wave2 = {n: t for n, t in WAVE_2.items() if only is None or n in only}
    port = iter(range(29600, 29700))

    def best(name: str) -> Path:
        return runs / logger_name(REPO / "configs" / "kanji" / name) / "version_0" / "checkpoints"

    with ThreadPoolExecutor(jobs) as pool:
        futures = {
            n: pool.submit(run_config, n, runs, trainer_args, [], next(port), timeout)
            for n in wave1
        }
        for n, f in futures.items():
            results[n] = f.result()
            print(f"configs: {n}: {results[n]['ok']}", file=sys.stderr, flush=True)
        futures = {}
        for n, teachers in wave2.items():
            missing = [t for t in teachers if not results.get(t, {}).get("ok")]
            if missing:
                results[n] = {"config": n, "ok": False, "failed_stage": "teacher",
                              "error_tail": f"teacher run(s) failed or not run: {missing}"}  # fmt: skip
                continue
            paths = [best(t) / "best.ckpt" for t in teachers]
            futures[n] = pool.submit(run_config, n, runs, trainer_args, paths, next(port), timeout)
        for n, f in futures.items():
            results[n] = f.result()
            print(f"configs: {n}: {results[n]['ok']}", file=sys.stderr, flush=True)
    return {"trainer_args": trainer_args, "configs": [results[n] for n in sorted(results)]}


def configs_table(result: dict) -> str:
    lines = [
        "| config | result | fit s | test s | test acc (2 batches) | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["configs"]:
        if r.get("skipped"):
            lines.append(f"| {r['config']} | skipped | | | | {r['skipped']} |")
            continue
        error = ""
        if not r["ok"]:
            last = [ln for ln in r.get("error_tail", "").strip().splitlines() if ln.strip()]
            error = f"{r.get('failed_stage')}: {last[-1][:150] if last else '?'}"
        acc = r.get("test_acc")
        lines.append(
            f"| {r['config']} | {'pass' if r['ok'] else 'FAIL'} | "
            f"{r.get('fit_seconds', 0):.0f} | {r.get('test_seconds', 0):.0f} | "
            f"{'' if acc is None else f'{acc:.3f}'} | {error.replace('|', '/')} |"
        )
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import lightning

    env = {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "date": time.strftime("%Y-%m-%d"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--parts", nargs="+", default=["precision", "fit", "configs"])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--fit-steps", type=int, default=30)
    parser.add_argument("--configs-precision", default="bf16-mixed")
    parser.add_argument("--configs", nargs="*", help="only these configs (default: all)")
    parser.add_argument("--jobs", type=int, default=4, help="configs run in parallel")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per metakd command")
    args = parser.parse_args()

    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else device.type
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    command = " ".join(["python", *sys.argv])
    tables = [f"# GPU checks\n\n`{command}`\n\n```\n{json.dumps(env, indent=1)}\n```"]

    def save(name: str, result: dict, table: str) -> None:
        result = {"command": command, "environment": env, **result}
        (args.out / f"gpu_{name}.json").write_text(json.dumps(result, indent=2))
        tables.append(f"## {name}\n\n{table}")
        print(f"\n## {name}\n\n{table}\n", flush=True)
        markdown = args.out / f"gpu_check_{'_'.join(args.parts)}.md"
        markdown.write_text("\n\n".join(tables) + "\n")

    if "precision" in args.parts:
        cfg = {"ways": 5, "shots": 1, "queries": 15, "tasks": 8, "size": 28, "hidden": 64,
               "inner_steps": 5}  # fmt: skip
        seeds = args.seeds
        if args.quick:
            cfg.update(queries=3, tasks=2, hidden=8, inner_steps=2)
            seeds = 1
        start = time.perf_counter()
        result = precision_part(device, seeds, cfg)
        result["seconds"] = time.perf_counter() - start
        save("precision", result, precision_tables(result))
    if "fit" in args.parts:
        precisions = ["32-true", "bf16-mixed", "16-mixed"]
        steps = 4 if args.quick else args.fit_steps
        result = fit_part(accelerator, steps, precisions, args.quick)
        save("fit", result, fit_table(result))
    if "configs" in args.parts:
        runs = Path("/tmp/gpu_check_runs") / str(os.getpid())
        start = time.perf_counter()
        result = configs_part(
            accelerator, args.configs_precision, runs, args.jobs, args.timeout, args.configs
        )
        result["seconds"] = time.perf_counter() - start
        save("configs", result, configs_table(result))


if __name__ == "__main__":
    main()
