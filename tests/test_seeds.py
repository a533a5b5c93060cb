"""Seeds: ``train_seed`` varies the training episodes alone; `metakd sweep` runs a config once per
seed and aggregates mean ± sd; paired differences of two configs over the same test episodes."""

from __future__ import annotations

import json
import os
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TinyDataModule

from lightning_metakd.data import FolderDataModule

TESTS = Path(__file__).resolve().parent
SHAPE = {"ways": 3, "shots": 1, "queries": 2, "meta_batch_size": 2, "steps_per_epoch": 3,
         "val_episodes": 4, "test_episodes": 6}  # fmt: skip


def tasks(dm, split: str) -> list:
    return list(dm.sampler(split).global_tasks())


def first_batch(dm, split: str = "train"):
    return next(iter(dm.dataloader(split)))


# -- train_seed --------------------------------------------------------------------------------------
def test_train_seed_changes_training_episodes_only():
    base = TinyDataModule(seed=0, **SHAPE)
    other = TinyDataModule(seed=0, train_seed=1, **SHAPE)
    for dm in (base, other):
        dm.setup("fit")
    assert tasks(base, "train") != tasks(other, "train")
    assert tasks(base, "val") == tasks(other, "val")
    assert tasks(base, "test") == tasks(other, "test")
    # The training stream of train_seed=1 is the one seed=1 draws; the default is seed's own.
    reference = TinyDataModule(seed=1, **SHAPE)
    reference.setup("fit")
    assert tasks(other, "train") == tasks(reference, "train")
    default = TinyDataModule(seed=0, train_seed=0, **SHAPE)
    default.setup("fit")
    assert base.train_seed == 0
    assert torch.equal(first_batch(base).support_x, first_batch(default).support_x)
    assert torch.equal(first_batch(base, "test").query_x, first_batch(other, "test").query_x)


def test_train_seed_keeps_a_seeded_class_split(tmp_path):
    from test_real_data import make_class_tree

    make_class_tree(tmp_path, [f"class{i:02d}" for i in range(12)], per_class=3)
    kwargs = {"image_size": 8, "ways": 2, "shots": 1, "queries": 1, "val_episodes": 2,
              "test_episodes": 2, "split_fractions": (0.5, 0.25, 0.25)}  # fmt: skip
    variants = {"seed 0": {}, "train_seed 5": {"train_seed": 5}, "seed 5": {"seed": 5}}
    split = {}
    for name, extra in variants.items():
        dm = FolderDataModule(tmp_path, **kwargs, **extra)
        dm.setup("fit")
        split[name] = {s: dm.splits[s].base_class_names for s in ("train", "val", "test")}
    assert split["seed 0"] == split["train_seed 5"]
    assert split["seed 0"] != split["seed 5"]


def test_train_seed_reaches_learn2learn_taskset_training_keys():
    pytest.importorskip("learn2learn")
    import learn2learn as l2l
    from test_learn2learn_adapter import SPLIT_CLASSES, TASK, make_taskset, tagged_tensors
    from torch.utils.data import TensorDataset

    from lightning_metakd.data import Learn2LearnDataModule

    full = l2l.data.MetaDataset(TensorDataset(*tagged_tensors(range(16))))
    splits = [l2l.data.FilteredMetaDataset(full, list(SPLIT_CLASSES[s])) for s in SPLIT_CLASSES]
    keys = {}
    for train_seed in (None, 3):
        dm = Learn2LearnDataModule(*(make_taskset(l2l, m) for m in splits), seed=7,
                                   train_seed=train_seed, **TASK)  # fmt: skip
        dm.setup()
        keys[train_seed] = {s: list(dm.sampler(s)) for s in ("train", "val", "test")}
    assert {k.seed for k in keys[None]["train"]} == {7}
    assert {k.seed for k in keys[3]["train"]} == {3}
    assert keys[None]["val"] == keys[3]["val"] and keys[None]["test"] == keys[3]["test"]


# -- run_seeds, paired_over_seeds, metakd sweep ------------------------------------------------------
def tiny_config(hidden: int = 4) -> dict:
    backbone = {"class_path": "lightning_metakd.models.Conv4",
                "init_args": {"in_channels": 1, "hidden": hidden, "image_size": 8}}  # fmt: skip
    return {
        "seed_everything": 0,
        "model": {"class_path": "lightning_metakd.modules.MetaLearnerModule",
                  "init_args": {"backbone": backbone, "ways": 3,
                                "algorithm": {"class_path": "lightning_metakd.algorithms.ProtoNet"}}},
        "data": {"class_path": "conftest.TinyDataModule",
                 "init_args": {**SHAPE, "test_episodes": 10, "image_size": 8}},
        "trainer": {"max_epochs": 1, "enable_progress_bar": False, "enable_model_summary": False},
    }  # fmt: skip


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """Conv4-4 and Conv4-6 ProtoNets, seeds 0 and 1 each, run in this process."""
    from lightning_metakd.seeds import run_seeds

    folder = tmp_path_factory.mktemp("sweeps")
    results, lines = {}, []
    for hidden in (4, 6):
        config = folder / f"conv4_{hidden}.yaml"
        config.write_text(yaml.safe_dump(tiny_config(hidden)))
        results[hidden] = run_seeds(config, [0, 1], folder / f"conv4_{hidden}",
                                    isolate=False, echo=lines.append)  # fmt: skip
    return folder, results, lines


def test_run_seeds_aggregates_mean_and_sd_over_seeds(sweeps):
    from lightning_metakd.modules import load_learner

    folder, results, lines = sweeps
    runs = results[4]
    assert runs.name == "conv4_4" and runs.seeds == [0, 1]
    accuracies = [r.marker["test"]["test/acc"] for r in runs.runs]
    summary = runs.summary()
    assert summary["accuracy"] == pytest.approx(statistics.mean(accuracies))
    assert summary["accuracy_sd"] == pytest.approx(statistics.stdev(accuracies))
    assert summary["ci95"] == pytest.approx(
        statistics.mean(r.marker["test"]["test/acc_ci95"] for r in runs.runs)
    )
    saved = json.loads((folder / "conv4_4" / "seeds.json").read_text())
    assert saved["summary"] == {**summary, "per_seed": {"0": accuracies[0], "1": accuracies[1]}}
    assert lines[0] == f"[sweep] conv4_4: seed 0 (1/2) running in {folder / 'conv4_4' / 'seed_0'}"
    # A seed sets the initialisation and the training episodes ...
    stage = yaml.safe_load((folder / "conv4_4" / "seed_1" / "stage_config.yaml").read_text())
    assert stage["seed_everything"] == 1 and stage["data"]["init_args"]["train_seed"] == 1
    first, second = (load_learner(r.checkpoint).state_dict() for r in runs.runs)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    # ... and never the test episodes: the data differs only in train_seed.
    data = [yaml.safe_load((r.run_dir / "config.yaml").read_text())["data"] for r in runs.runs]
    assert [d["init_args"].pop("train_seed") for d in data] == [0, 1]
    assert data[0] == data[1]


def test_a_seed_reproduces_its_run(sweeps, tmp_path):
    from lightning_metakd.seeds import run_seeds

    folder, results, _ = sweeps
    again = run_seeds(folder / "conv4_4.yaml", [1], tmp_path / "again", isolate=False,
                      echo=lambda line: None)  # fmt: skip
    assert again.runs[0].marker["test"] == results[4].runs[1].marker["test"]


def test_finished_seeds_are_skipped_and_changed_configs_rerun(sweeps, tmp_path, monkeypatch):
    from lightning_metakd import seeds

    folder, results, _ = sweeps
    copy = tmp_path / "conv4_4"
    shutil.copytree(folder / "conv4_4", copy)
    for run in copy.glob("seed_*/done.json"):  # the copy's runs live in their new folder
        marker = json.loads(run.read_text())
        marker["inputs"] = seeds._digest(seeds.run_config(marker["seed"], folder / "conv4_4.yaml",
                                                          copy, {}))  # fmt: skip
        run.write_text(json.dumps(marker))

    def must_not_run(run_dir, fields):
        raise AssertionError(f"ran {run_dir}")

    monkeypatch.setattr(seeds, "run_one", must_not_run)
    lines = []
    kept = seeds.run_seeds(folder / "conv4_4.yaml", [0, 1], copy, isolate=False, echo=lines.append)
    assert lines == ["[sweep] conv4_4: seed 0 (1/2) skipped (finished; done.json)",
                     "[sweep] conv4_4: seed 1 (2/2) skipped (finished; done.json)"]  # fmt: skip
    assert kept.summary()["accuracy"] == results[4].summary()["accuracy"]
    # finished_only trains nothing: an outdated or missing run is an error, and stays on disk.
    assert seeds.run_seeds(folder / "conv4_4.yaml", [0, 1], copy, isolate=False,
                           echo=lines.append, finished_only=True).summary() == kept.summary()  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"seed 0 has no finished run .*for another config"):
        seeds.run_seeds(folder / "conv4_4.yaml", [0], copy, overrides={"trainer.max_epochs": 2},
                        isolate=False, finished_only=True)  # fmt: skip
    assert (copy / "seed_0" / "done.json").is_file()
    with pytest.raises(FileNotFoundError, match=r"seed 7 has no finished run .*missing"):
        seeds.run_seeds(folder / "conv4_4.yaml", [7], copy, isolate=False, finished_only=True)
    with pytest.raises(AssertionError, match="ran .*seed_0"):
        seeds.run_seeds(folder / "conv4_4.yaml", [0], copy, overrides={"trainer.max_epochs": 2},
                        isolate=False, echo=lines.append)  # fmt: skip


def test_paired_differences_over_seeds_use_the_same_test_episodes(sweeps, tmp_path):
    from lightning_metakd.seeds import paired_over_seeds, paired_table

    _, results, _ = sweeps
    paired = paired_over_seeds(results[4], results[6], tmp_path)
    assert [p["seed"] for p in paired["per_seed"]] == [0, 1]
    for p, small, wide in zip(paired["per_seed"], results[4].runs, results[6].runs, strict=True):
        # compare() measures each checkpoint on the very episodes its own `metakd test` used.
        assert p["reference_accuracy"] == pytest.approx(small.accuracy, abs=1e-6)
        assert p["other_accuracy"] == pytest.approx(wide.accuracy, abs=1e-6)
        assert p["diff"] == pytest.approx(wide.accuracy - small.accuracy, abs=1e-6)
        assert p["diff_ci95"] >= 0
    diffs = [p["diff"] for p in paired["per_seed"]]
    assert paired["summary"]["diff"] == pytest.approx(statistics.mean(diffs))
    assert paired["summary"]["diff_sd"] == pytest.approx(statistics.stdev(diffs))
    assert json.loads((tmp_path / "paired.json").read_text()) == paired
    assert paired_table([paired]).splitlines()[2].startswith("| conv4_6 | conv4_4 | 2 | ")
    with pytest.raises(ValueError) as err:
        paired_over_seeds(results[4], results[4], tmp_path)
    assert str(err.value) == (
        "both sweeps are named 'conv4_4'; give run_seeds(..., name=) two names."
    )


def test_sweep_errors_are_clear(tmp_path, capsys):
    from lightning_metakd.cli import main
    from lightning_metakd.seeds import run_seeds

    config = tmp_path / "a.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    assert main(["sweep", "--config", str(config), "--set", "trainer.max_epochs"]) == 2
    assert capsys.readouterr().err == (
        "metakd sweep: error: --set 'trainer.max_epochs': write KEY=VALUE, e.g. --set "
        "trainer.max_epochs=2.\n"
    )
    assert main(["sweep", "--config", str(config), "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        "metakd sweep: error: two configs are named alike (['a', 'a']); name them NAME=YAML.\n"
    )
    assert main(["sweep", "--config", str(config), "--set", "b:trainer.max_epochs=2"]) == 2
    assert capsys.readouterr().err == (
        "metakd sweep: error: --set 'b:trainer.max_epochs=2': 'b' is not one of the configs "
        "['a'].\n"
    )
    with pytest.raises(ValueError) as err:
        run_seeds(config, [0, 0], tmp_path)
    assert str(err.value) == "seeds must be distinct integers, at least one; got [0, 0]."


@pytest.mark.slow
def test_sweep_command_runs_each_seed_in_a_subprocess(tmp_path, monkeypatch, capsys):
    from lightning_metakd.cli import main

    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config()))
    args = ["sweep", "--config", str(config), "--config", f"wide={config}", "--seeds", "0", "1",
            "--set", "trainer.max_epochs=1", "--out", "out"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    tiny, wide = (r["summary"] for r in saved["runs"])
    # The same config under two names: the same numbers, seed for seed, and no difference.
    assert tiny["per_seed"] == wide["per_seed"] and len(set(tiny["per_seed"].values())) == 2
    assert saved["paired"][0]["summary"]["diff"] == 0.0
    assert "| tiny | 2 | " in out and "| wide | tiny | 2 | +0.00 ± 0.00 |" in out
    assert (tmp_path / "out" / "sweep.md").read_text() in out
    assert "Trainer" in (tmp_path / "out" / "tiny" / "seed_0" / "log.txt").read_text()
