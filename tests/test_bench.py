"""`metakd bench`: the published settings on a user's copy of the data, reported vs ours.

The runs here use fabricated tiny Omniglot trees and the ``--quick`` budget: their accuracies mean
nothing; the table's shape, the published numbers and the bookkeeping (seeds, steps, test
episodes, normalisation policy, resuming) do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from test_real_data import make_alphabets

from lightning_metakd.bench import (
    CONFIGS,
    PUBLISHED,
    QUICK,
    bench_table,
    normalization_policy,
    run_bench,
    select_settings,
)
from lightning_metakd.cli import main
from lightning_metakd.pipeline import expand_dotted, merge_config

TESTS = Path(__file__).resolve().parent
FIVE_WAY_ONE_SHOT = ["omniglot/maml_5way_1shot", "omniglot/protonet_5way_1shot"]


@pytest.fixture(scope="module")
def omniglot(tmp_path_factory) -> Path:
    """10 alphabets x 5 characters x 16 drawings: enough for the 5-way 1-shot settings (whole
    alphabets 0.7/0.1/0.2: 35 training characters, x4 rotations, 5 for validation, 10 for test)."""
    root = tmp_path_factory.mktemp("omniglot")
    make_alphabets(root, {f"Alphabet{a:02d}": 5 for a in range(10)}, per_character=16,
                   distinct=True)  # fmt: skip
    return root


@pytest.fixture(scope="module")
def bench(omniglot, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    lines = []
    rows = run_bench(omniglot, select_settings(FIVE_WAY_ONE_SHOT), out, overrides=QUICK,
                     isolate=False, echo=lines.append)  # fmt: skip
    return out, rows, lines


def test_the_published_numbers():
    reported = {s.name: s.reported for s in PUBLISHED}
    assert reported == {
        "omniglot/maml_5way_1shot": 98.7, "omniglot/maml_5way_5shot": 99.9,
        "omniglot/maml_20way_1shot": 95.8, "omniglot/maml_20way_5shot": 98.9,
        "omniglot/protonet_5way_1shot": 98.8, "omniglot/protonet_5way_5shot": 99.7,
        "omniglot/protonet_20way_1shot": 96.0, "omniglot/protonet_20way_5shot": 98.9,
        "miniimagenet/maml_conv4_1shot": 48.70, "miniimagenet/maml_conv4_5shot": 63.11,
        "miniimagenet/protonet_conv4_1shot": 49.42, "miniimagenet/protonet_conv4_5shot": 68.20,
    }  # fmt: skip


@pytest.mark.parametrize("setting", PUBLISHED, ids=lambda s: s.name)
def test_each_setting_tests_what_its_title_says(setting):
    """The config (with the setting's overrides) tests the N-way K-shot task of the paper's row."""
    config = yaml.safe_load((CONFIGS / setting.config).read_text())
    config = merge_config(config, expand_dotted(dict(setting.overrides)))
    data = config["data"]["init_args"]
    ways = data.get("test_ways") or data["ways"]
    shots = data.get("test_shots") or data["shots"]
    assert f"{ways}-way {shots}-shot" in setting.title
    algorithm = config["model"]["init_args"]["algorithm"]["class_path"].rpartition(".")[2]
    assert setting.title.startswith({"MAML": "MAML,", "ProtoNet": "ProtoNet,"}[algorithm])
    assert config["data"]["class_path"].endswith(
        {"omniglot": "OmniglotDataModule", "miniimagenet": "MiniImageNetDataModule"}[
            setting.dataset
        ]
    )
    if algorithm == "MAML":  # a MAML head trains and tests with one number of ways
        assert config["model"]["init_args"]["ways"] == data["ways"] == ways


def test_settings_are_chosen_by_name_or_glob():
    assert [s.name for s in select_settings(["omniglot/maml_*"])] == [
        "omniglot/maml_5way_1shot", "omniglot/maml_5way_5shot",
        "omniglot/maml_20way_1shot", "omniglot/maml_20way_5shot",
    ]  # fmt: skip
    with pytest.raises(ValueError) as err:
        select_settings(["omniglot/maml_*", "omniglot/reptile"])
    assert str(err.value) == (
        "no published setting matches 'omniglot/reptile'; `metakd bench --list` lists them "
        "(e.g. omniglot/maml_5way_1shot, 'omniglot/*')."
    )
    with pytest.raises(ValueError) as err:
        select_settings(["omniglot/maml_5way_1shot", "miniimagenet/*"])
    assert str(err.value) == (
        "the settings read miniimagenet and omniglot, but one --root holds one data set; run "
        "them separately, e.g. --settings 'miniimagenet/*'."
    )


def test_bench_rows_put_ours_beside_the_published_numbers(bench, omniglot):
    out, rows, lines = bench
    assert [r["name"] for r in rows] == FIVE_WAY_ONE_SHOT
    assert [r["reported"] for r in rows] == [98.7, 98.8]
    for row in rows:
        marker = json.loads((out / row["name"] / "seed_0" / "done.json").read_text())
        assert row["ours"] == pytest.approx(100 * marker["test"]["test/acc"])
        assert row["ci95"] == pytest.approx(100 * marker["test"]["test/acc_ci95"])
        assert row["diff"] == pytest.approx(row["ours"] - row["reported"])
        assert row["ours_sd"] is None and row["seeds"] == [0]
        # The budget each row really had, and the policy its checkpoint records.
        assert (row["steps"], row["test_episodes"]) == (2, 20)
        assert row["normalization"] == "transductive"
        stage = yaml.safe_load((out / row["name"] / "seed_0" / "stage_config.yaml").read_text())
        assert stage["data"]["init_args"]["root"] == str(omniglot)
    saved = json.loads((out / "bench.json").read_text())
    assert saved["rows"] == rows and saved["overrides"] == QUICK
    table = (out / "bench.md").read_text()
    assert table == bench_table(rows, QUICK)
    body = table.splitlines()
    assert body[2].startswith("| MAML, Omniglot 5-way 1-shot | 98.70 | ")
    assert body[2].endswith("| transductive | 0 | 2 | 20 | Finn et al. 2017, Table 1 |")
    assert body[3].startswith("| ProtoNet, Omniglot 5-way 1-shot | 98.80 | ")
    assert body[-1].startswith("Overrides on every setting: trainer.max_steps=2, ")
    assert body[-1].endswith("(not the published budget).")


def test_bench_resumes_finished_runs(bench, omniglot, monkeypatch):
    from lightning_metakd import seeds

    out, rows, _ = bench

    def must_not_run(run_dir, fields):
        raise AssertionError(f"ran {run_dir}")

    monkeypatch.setattr(seeds, "run_one", must_not_run)
    lines = []
    again = run_bench(omniglot, select_settings(FIVE_WAY_ONE_SHOT), out, overrides=QUICK,
                      isolate=False, echo=lines.append)  # fmt: skip
    assert again == rows
    assert lines == [
        "[sweep] MAML, Omniglot 5-way 1-shot: seed 0 (1/1) skipped (finished; done.json)",
        "[sweep] ProtoNet, Omniglot 5-way 1-shot: seed 0 (1/1) skipped (finished; done.json)",
    ]


def test_the_normalisation_policy_comes_from_the_checkpoint(bench, tmp_path):
    out, _, _ = bench
    checkpoint = out / "omniglot/protonet_5way_1shot/seed_0/checkpoints/last.ckpt"
    raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert raw["metakd_components"]["learner"]["normalization"] == "transductive"
    assert normalization_policy(checkpoint) == "transductive"
    raw["metakd_components"]["learner"]["normalization"] = "support"
    torch.save(raw, tmp_path / "support.ckpt")
    assert normalization_policy(tmp_path / "support.ckpt") == "support"
    # lightning-metakd 0.1 checkpoints recorded no policy: transductive batch statistics.
    assert normalization_policy(TESTS / "data" / "v0.1-maml-conv4.ckpt") == "transductive"
    assert normalization_policy(TESTS / "data" / "v0.1-distill-protonet.ckpt") == "transductive"


def test_bench_errors_are_clear(tmp_path, capsys):
    assert main(["bench", "--settings", "omniglot/*"]) == 2
    assert capsys.readouterr().err == (
        "metakd bench: error: give --root (your copy of the data) and --settings (see --list), "
        "e.g. --root ~/data/omniglot --settings 'omniglot/*' --quick.\n"
    )
    missing = tmp_path / "nowhere"
    assert main(["bench", "--root", str(missing), "--settings", "omniglot/*"]) == 2
    assert capsys.readouterr().err == (
        f"metakd bench: error: --root {missing} is not a folder; pass the folder that holds your "
        "copy of the data set (nothing is downloaded).\n"
    )
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 1 + len(PUBLISHED)
    assert listed[1].split() == ["omniglot/maml_5way_1shot", "98.70%", "Finn", "et", "al.",
                                 "2017,", "Table", "1", "(configs/omniglot/maml_5way_1shot.yaml)"]  # fmt: skip


@pytest.mark.slow
def test_bench_command_with_a_step_cap(omniglot, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    args = ["bench", "--root", str(omniglot), "--settings", "omniglot/protonet_5way_1shot",
            "--quick", "--max_steps", "1", "--seeds", "0", "1", "--out", str(tmp_path / "b")]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    (row,) = json.loads((tmp_path / "b" / "bench.json").read_text())["rows"]
    assert (row["steps"], row["seeds"], row["test_episodes"]) == (1, [0, 1], 20)
    assert row["ours_sd"] is not None and row["ours_sd"] >= 0
    assert "| ProtoNet, Omniglot 5-way 1-shot | 98.80 | " in out
    assert "trainer.max_steps=1" in out
