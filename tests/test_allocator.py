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

# Second-order MAML training steps of 8 tasks (Conv4-64, 5-way 1-shot, 5 queries per class, so
# every activation is under the 8 MiB mmap threshold); the median step's page faults after two
# warm-up steps.
WORKLOAD = """
import resource, warnings, torch
from lightning_metakd.algorithms import MAML
from lightning_metakd.data import Episode
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule

warnings.filterwarnings("ignore", message=".*self.log.*")
torch.set_num_threads(1)
torch.manual_seed(0)
tasks, labels = 8, torch.arange(5)
learner = MetaLearnerModule(Conv4(1, 64, image_size=28), MAML(0.4), ways=5, vmap_tasks=False)
episode = Episode(torch.randn(tasks, 5, 1, 28, 28), labels.expand(tasks, -1),
                  torch.randn(tasks, 25, 1, 28, 28), labels.repeat_interleave(5).expand(tasks, -1),
                  labels.expand(tasks, -1))
counts = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    learner.training_step(episode, 0).backward()
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(counts[2:])[1]
"""
REPORT = "import json; print(json.dumps({'faults': faults, 'tuned': allocator._tuned}))"


def run(script: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc
def test_tuning_removes_most_page_faults_of_maml_steps():
    faults = {}
    for tuned in (False, True):
        setup = "from lightning_metakd.modules import allocator\n"
        setup += (
            "assert allocator.tune_cpu_allocator() and allocator.tune_cpu_allocator()\n" * tuned
        )
        out = run(setup + WORKLOAD + REPORT)
        assert out["tuned"] is tuned
        faults[tuned] = out["faults"]
    # Measured: 26,000-58,000 faults per step with glibc's defaults, 1-450 tuned.
    assert faults[False] > 10_000
    assert faults[True] < 0.1 * faults[False]


@pytest.mark.slow
@glibc
@pytest.mark.parametrize("tune", [True, False])
def test_a_cpu_fit_tunes_the_allocator_unless_told_not_to(tune):
    # ``_tuned`` is set only when every mallopt call succeeded. Page faults are not compared
    # here: a whole fit before the workload moves glibc's adaptive thresholds (in CI the untuned
    # process then faulted 91,628 times against 69,847), so the fault test above runs the
    # workload in a fresh process instead.
    fit = f"""
import sys, lightning as L
sys.path.insert(0, "tests")
from conftest import TinyDataModule
from lightning_metakd.algorithms import ProtoNet
from lightning_metakd.models import Conv4
from lightning_metakd.modules import MetaLearnerModule, allocator

assert not allocator._tuned
dm = TinyDataModule(ways=3, shots=1, queries=2, meta_batch_size=2, steps_per_epoch=1,
                    val_episodes=2, test_episodes=2)
module = MetaLearnerModule(Conv4(hidden=4, image_size=8), ProtoNet(), ways=3,
                           tune_cpu_allocator={tune})
L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
          enable_progress_bar=False, limit_val_batches=0).fit(module, dm)
import json; print(json.dumps({{"tuned": allocator._tuned}}))
"""
    assert run(fit) == {"tuned": tune}


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
