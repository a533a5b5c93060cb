"""glibc malloc tuning for CPU meta-training (``modules/allocator.py``).

``mallopt`` settings are process-wide and cannot be undone, so every measurement runs in a fresh
Python process. The measure is page faults (``getrusage().ru_minflt``), not time: what the tuning
removes is the page-faulting of freed-and-reallocated activation memory, which is exact to count
and insensitive to a busy machine.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from lightning_metakd.modules import allocator

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt exists only in glibc",
)

# One second-order MAML task (Conv4-64, 5-way 1-shot, 15 queries): the benchmark's workload.
WORKLOAD = """
import resource, torch, torch.nn.functional as F
from lightning_metakd.algorithms import MAML
from lightning_metakd.models import Conv4
from lightning_metakd.models.classifier import Classifier

torch.set_num_threads(1)
torch.manual_seed(0)
model = Classifier(Conv4(1, 64, image_size=28), ways=5)
params = dict(model.named_parameters())
sx, qx = torch.randn(1, 5, 1, 28, 28), torch.randn(1, 75, 1, 28, 28)
sy, qy = torch.arange(5)[None], torch.arange(5).repeat_interleave(15)


def task():
    logits = MAML(inner_lr=0.4).episode_logits(model, params, sx, sy, qx, 5, True, False)
    F.cross_entropy(logits[0], qy).backward()


for _ in range(3):  # warm-up: the heap grows to the working set
    task()
counts = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    task()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(counts)[2]  # the median task
"""


def run(script: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc
def test_tuning_removes_the_page_faults_of_a_maml_task():
    result = {}
    for tuned in (False, True):
        setup = "from lightning_metakd.modules import tune_cpu_allocator\n"
        setup += "assert tune_cpu_allocator() and tune_cpu_allocator()\n" if tuned else ""
        out = run(setup + WORKLOAD + "import json; print(json.dumps({'faults': faults}))")
        result[tuned] = out["faults"]
    # Measured: about 11,000 faults per task with glibc's defaults, under 10 tuned.
    assert result[False] > 2000
    assert result[True] < 0.05 * result[False]


@pytest.mark.slow
@glibc
@pytest.mark.parametrize("tune", [True, False])
def test_a_cpu_fit_tunes_the_allocator_unless_told_not_to(tune):
    fit = f"""
import sys, lightning as L
sys.path.insert(0, "tests")
from conftest import TinyDataModule
from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule
from lightning_metakd.modules import allocator

dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=1,
                    val_episodes=2, test_episodes=2)
module = MetaLearnerModule(Conv4(hidden=4, image_size=8), ProtoNet(), ways=3,
                           tune_cpu_allocator={tune})
L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
          enable_progress_bar=False, limit_val_batches=0).fit(module, dm)
tuned = allocator._tuned
"""
    out = run(fit + WORKLOAD + "import json; print(json.dumps({'faults': faults, 'tuned': tuned}))")
    assert out["tuned"] is tune
    if tune:
        assert out["faults"] < 100
    else:
        assert out["faults"] > 2000


def test_only_cpu_runs_are_tuned(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setattr(allocator, "tune_cpu_allocator", lambda: calls.append(1) or True)

    def trainer(device: str) -> SimpleNamespace:
        return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)))

    allocator.configure_cpu_allocator(trainer("cuda"), tune=True)
    allocator.configure_cpu_allocator(trainer("cpu"), tune=False)
    allocator.configure_cpu_allocator(None, tune=True)
    assert calls == []
    allocator.configure_cpu_allocator(trainer("cpu"), tune=True)
    assert calls == [1]


def test_without_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(allocator, "_tuned", False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert allocator.tune_cpu_allocator() is False
    script = textwrap.dedent(
        """
        import platform, json
        platform.libc_ver = lambda: ("", "")
        from lightning_metakd.modules import allocator
        print(json.dumps({"tuned": allocator.tune_cpu_allocator()}))
        """
    )
    assert run(script) == {"tuned": False}
