"""`metakd pipeline`: config checks, which stages rerun, and the real command end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_metakd import pipeline
from lightning_metakd.lightning_cli import run_lightning_cli
from lightning_metakd.modules import DistillationModule, MetaLearnerModule
from lightning_metakd.pipeline import (
    STAGES,
    PipelineConfigError,
    expand_dotted,
    load_pipeline_config,
    merge_config,
    read_marker,
    run_pipeline,
    stage_config,
)

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = sorted((ROOT / "configs").rglob("pipeline.yaml"))
QUICKSTART = ROOT / "configs" / "kanji" / "quickstart"

#: A user's MetaLearnerModule subclass, written into a folder on PYTHONPATH by the tests.
USER_MODULE = '''
from lightning_metakd.modules import MetaLearnerModule


class CountingLearner(MetaLearnerModule):
    """A user's learner: reports how many optimisation steps it took."""

    def on_fit_end(self):
        print(f"CountingLearner trained {self.global_step} steps", flush=True)
'''


def test_there_is_a_pipeline_config():
    assert ROOT / "configs" / "kanji" / "pipeline.yaml" in PIPELINES


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_pipeline_configs_build_every_stage(path, tmp_path):
    spec = load_pipeline_config(path, run_dir=tmp_path / "run")
    assert spec.run_dir == (tmp_path / "run").resolve()
    built = {}
    for stage in ("teacher", "student_baseline", "distill"):
        config = stage_config(spec, stage, teacher_checkpoint=str(tmp_path / "teacher.ckpt"))
        config_path = tmp_path / f"{stage}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        cli = run_lightning_cli(["--config", str(config_path)], run=False)
        built[stage] = cli
        assert cli.trainer.logger.log_dir.rstrip("/") == str(spec.run_dir / stage)
        assert cli.trainer.checkpoint_callback.dirpath == str(spec.run_dir / stage / "checkpoints")
        assert cli.trainer.checkpoint_callback.monitor == "val/acc"
    teacher, baseline, distill = (
        built[s].model for s in ("teacher", "student_baseline", "distill")
    )
    assert type(teacher) is MetaLearnerModule and type(baseline) is MetaLearnerModule
    assert isinstance(distill, DistillationModule)
    assert distill.hparams["teacher"] == str(tmp_path / "teacher.ckpt")
    # The baseline is the distilled student's architecture and algorithm, trained without a teacher.
    assert baseline.learner.components() == distill.student.components()
    params = lambda m: sum(p.numel() for p in m.model.parameters())  # noqa: E731
    assert params(distill.student) < params(teacher.learner)
    # Every learner is tested on the same fixed episodes.
    test_keys = ("test_ways", "test_shots", "test_queries", "test_episodes", "seed", "grouping")
    episodes = [{k: built[s].datamodule.hparams[k] for k in test_keys} for s in built]
    assert episodes[0] == episodes[1] == episodes[2]


def test_quickstart_settings():
    """Small teacher, Conv4-8 student, within-radical 5-way 1-shot tests: the brief's quickstart."""
    teacher = yaml.safe_load((QUICKSTART / "teacher.yaml").read_text())
    distill = yaml.safe_load((QUICKSTART / "distill.yaml").read_text())
    assert teacher["model"]["init_args"]["backbone"]["init_args"]["hidden"] == 32
    assert distill["model"]["init_args"]["student_backbone"]["init_args"]["hidden"] == 8
    data = distill["data"]["init_args"]
    assert (data["test_ways"], data["test_shots"], data["grouping"]) == (5, 1, "radical")


def test_expand_dotted_and_merge():
    assert expand_dotted({"a.b": 1, "a": {"c.d": 2}}) == {"a": {"b": 1, "c": {"d": 2}}}
    base = {"model": {"class_path": "A", "init_args": {"x": 1, "y": [1, 2]}}, "k": 1}
    merged = merge_config(base, {"model": {"init_args": {"y": [3]}}})
    assert merged == {"model": {"class_path": "A", "init_args": {"x": 1, "y": [3]}}, "k": 1}
    assert base["model"]["init_args"]["y"] == [1, 2]  # the inputs are not modified
    swapped = merge_config(base, {"model": {"class_path": "B", "init_args": {"z": 0}}})
    assert swapped["model"] == {"class_path": "B", "init_args": {"z": 0}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nme: x\n", "unknown key"),
        ("name: x\n", "the 'teacher' stage needs a config file"),
        ("name: x\nteacher: {config: nope.yaml}\nstudent_baseline: s.yaml\ndistill: d.yaml\n",
         "does not exist"),
        ("name: x\noverrides: [1]\n", "must be a mapping"),
        ("name: a/b\n", "folder name"),
        ("name: x\nthreads: 0\n", "threads must be a positive integer"),
    ],
)  # fmt: skip
def test_bad_pipeline_configs_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    with pytest.raises(PipelineConfigError, match=message):
        load_pipeline_config(path)


def test_bad_config_exits_with_a_message(tmp_path, capsys):
    path = tmp_path / "pipeline.yaml"
    path.write_text("nme: x\n")
    assert pipeline.pipeline_main(["--config", str(path)]) == 2
    assert "unknown key(s) ['nme']" in capsys.readouterr().err


# -- which stages run: the stage runners replaced by fakes that record their calls ------------------
@pytest.fixture
def fake_stages(monkeypatch, tmp_path):
    calls: list[str] = []

    def train(stage, config, stage_dir, test=True):
        calls.append(stage)
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "partial.txt").write_text("written before done.json")
        tested = {"test/acc": 0.5} if test else {}
        return {"checkpoint": str(stage_dir / "best.ckpt"), "test": tested, "best_val_acc": 0.25}

    def report(spec, markers):
        calls.append("report")
        (spec.run_dir / "report.md").write_text("| learner |\n")
        return {"teacher_run": markers["teacher"]["run_id"]}

    monkeypatch.setattr(pipeline.stages, "run_training_stage", train)
    monkeypatch.setattr(pipeline.stages, "run_report_stage", report)
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"name: fake\nteacher: {QUICKSTART / 'teacher.yaml'}\n"
        f"student_baseline: {QUICKSTART / 'student_baseline.yaml'}\n"
        f"distill: {QUICKSTART / 'distill.yaml'}\n"
    )
    return calls, path, tmp_path / "run"


def _run(path, run_dir, **kwargs):
    lines: list[str] = []
    markers = run_pipeline(load_pipeline_config(path, run_dir), echo=lines.append, **kwargs)
    return markers, "\n".join(lines)


def test_finished_stages_are_skipped_and_dependants_rerun(fake_stages):
    calls, path, run_dir = fake_stages
    markers, out = _run(path, run_dir)
    assert calls == list(STAGES)
    assert "[pipeline] stage 3/4: distill (new)" in out
    distill = read_marker(run_dir, "distill")
    assert distill["depends_on"] == {"teacher": markers["teacher"]["run_id"]}
    assert distill["test"] == {"test/acc": 0.5}

    calls.clear()
    _, out = _run(path, run_dir)
    assert calls == []
    assert out.count("skipped") == 4 and "| learner |" in out

    (run_dir / "teacher" / "done.json").unlink()  # the teacher was interrupted: no marker
    calls.clear()
    _, out = _run(path, run_dir)
    assert calls == ["teacher", "distill", "report"]
    assert "distill (teacher ran again)" in out
    assert "student_baseline skipped" in out

    (run_dir / "student_baseline" / "done.json").unlink()
    calls.clear()
    _run(path, run_dir)
    assert calls == ["student_baseline", "report"]

    calls.clear()
    _, out = _run(path, run_dir, force=True)
    assert calls == list(STAGES) and out.count("(--force)") == 4


def test_a_rerun_stage_starts_from_a_clean_folder(fake_stages):
    calls, path, run_dir = fake_stages
    _run(path, run_dir)
    stale = run_dir / "distill" / "stale.ckpt"
    stale.write_text("from a killed run")
    (run_dir / "distill" / "done.json").unlink()
    _run(path, run_dir)
    assert not stale.exists() and (run_dir / "distill" / "done.json").is_file()


def test_a_changed_stage_config_reruns_that_stage(fake_stages):
    calls, path, run_dir = fake_stages
    _run(path, run_dir)
    text = path.read_text().replace(
        "distill.yaml", "distill.yaml\n  overrides: {trainer.max_epochs: 9}"
    )
    path.write_text(text.replace("distill: ", "distill:\n  config: "))
    calls.clear()
    _, out = _run(path, run_dir)
    assert calls == ["distill", "report"]
    assert "distill (its config changed)" in out and "report (distill ran again)" in out


# -- stages side by side (``processes: 2``) ----------------------------------------------------------
class InlineStage:
    """Stands in for :class:`~lightning_metakd.pipeline.run.BackgroundStage`: runs the (fake) stage
    at once, in this process, so the scheduling can be checked without spawning."""

    started: list[str] = []

    def __init__(self, stage, work, args, log, threads):
        InlineStage.started.append(stage)
        self.stage, self.log = stage, log
        # the report's prefetch is not run: its real work needs real checkpoints
        is_training = work is pipeline.stages.run_training_stage
        self._result = work(*args) if is_training else {"learners": len(args[1])}

    @classmethod
    def training(cls, stage, config, stage_dir, test, threads):
        args = (stage, config, stage_dir, test)
        return cls(
            stage, pipeline.stages.run_training_stage, args, stage_dir / "stage.log", threads
        )

    def done(self):
        return True

    def result(self):
        return self._result, 2.0

    def stop(self):
        pass


def test_two_processes_train_the_baseline_beside_the_teacher(fake_stages, monkeypatch):
    calls, path, run_dir = fake_stages
    monkeypatch.setattr(pipeline.run, "BackgroundStage", InlineStage)
    InlineStage.started = []
    markers, out = _run(path, run_dir, processes=2)
    # the only stage that needs no teacher; then, beside distill, the report's early measurements
    assert InlineStage.started == ["student_baseline", "report prefetch"]
    assert calls == ["student_baseline", "teacher", "distill", "report"]
    lines = [line for line in out.splitlines() if "stage " in line]
    assert lines[:2] == [
        "[pipeline] stage 1/4: teacher (new)",
        "[pipeline] stage 2/4: student_baseline (new), in a process of its own beside teacher; "
        f"its output: {run_dir / 'student_baseline' / 'stage.log'}",
    ]
    assert lines[3].startswith("[pipeline] stage 2/4: student_baseline done in 2 s")  # its own time
    assert read_marker(run_dir, "student_baseline")["seconds"] == 2.0
    assert (
        markers["report"]["depends_on"]["student_baseline"] == markers["student_baseline"]["run_id"]
    )
    assert read_marker(run_dir, "distill")["depends_on"] == {
        "teacher": markers["teacher"]["run_id"]
    }

    # The teacher finished: the baseline and the distilled student are both ready at once.
    for stage in ("student_baseline", "distill"):
        (run_dir / stage / "done.json").unlink()
    calls.clear()
    InlineStage.started = []
    _, out = _run(path, run_dir, processes=2)
    assert "teacher skipped" in out and InlineStage.started == ["distill"]
    assert calls == ["distill", "student_baseline", "report"]

    calls.clear()
    _, out = _run(path, run_dir, processes=2)  # nothing to do: nothing starts
    assert calls == [] and out.count("skipped") == 4


def test_one_process_runs_the_stages_in_order(fake_stages, monkeypatch):
    calls, path, run_dir = fake_stages
    monkeypatch.setattr(pipeline.run, "BackgroundStage", InlineStage)
    InlineStage.started = []
    path.write_text(path.read_text() + "processes: 2\n")
    assert load_pipeline_config(path).processes == 2
    _, out = _run(path, run_dir, processes=1)  # the flag overrides the YAML
    assert InlineStage.started == [] and calls == list(STAGES)
    assert "in a process of its own" not in out


def test_bad_processes_are_clear_errors(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text((ROOT / "configs" / "kanji" / "pipeline.yaml").read_text())
    text = path.read_text()
    for bad in ("0", "two", "true"):
        path.write_text(text + f"\nprocesses: {bad}\n")
        with pytest.raises(PipelineConfigError, match="processes must be a positive integer"):
            load_pipeline_config(path)
    path.write_text(text.replace("quickstart/", str(QUICKSTART) + "/"))
    assert pipeline.pipeline_main(["--config", str(path), "--processes", "0"]) == 2
    assert "--processes must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stage_that_fails_in_its_own_process_says_which_and_where_to_look(tmp_path):
    from lightning_metakd.pipeline.run import BackgroundStage

    config = {"model": {"class_path": "no_such_package.Learner"}, "trainer": {"logger": False}}
    stage = BackgroundStage.training("student_baseline", config, tmp_path, True, 1)
    with pytest.raises(RuntimeError, match=r"the student_baseline stage failed: .*no_such_package"):
        stage.result()
    log = (tmp_path / "stage.log").read_text()
    assert "Traceback" in log and "no_such_package" in log


# -- the real command ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kanji_cache(tmp_path_factory) -> Path:
    """One tiny KanjiVG render per test session (never the user's cache)."""
    return tmp_path_factory.getbasetemp() / "kanji-tiny-cache"


def tiny_data(cache: Path) -> dict:
    return {
        "max_classes": 120, "max_classes_per_group": 8, "samples_per_class": 17,
        "cache_dir": str(cache), "num_workers": 0, "ways": 5, "queries": 3,
        "steps_per_epoch": 3, "val_episodes": 4, "test_episodes": 6,
    }  # fmt: skip


def _metakd(args, cwd, pythonpath):
    # This checkout's code, whichever lightning-metakd the environment has installed.
    path = os.pathsep.join([str(pythonpath), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "-m", "lightning_metakd.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_pipeline_command_end_to_end(tmp_path, kanji_cache, monkeypatch, capsys):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "my_learners.py").write_text(USER_MODULE)
    baseline = yaml.safe_load((QUICKSTART / "student_baseline.yaml").read_text())
    baseline["model"]["class_path"] = "my_learners.CountingLearner"  # a user's subclass
    (tmp_path / "baseline.yaml").write_text(yaml.safe_dump(baseline))
    config = {
        "name": "tiny",
        "overrides": {
            "data.init_args": tiny_data(kanji_cache),
            "model.init_args.ways": 5,
            "trainer": {
                "max_epochs": 1,
                "enable_progress_bar": False,
                "enable_model_summary": False,
            },
        },  # fmt: skip
        "teacher": {"config": str(QUICKSTART / "teacher.yaml")},
        "student_baseline": {"config": "baseline.yaml"},
        "distill": {"config": str(QUICKSTART / "distill.yaml")},
        "report": {"warmup": 0, "repeats": 1},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    command = ["pipeline", "--config", str(path)]
    run_dir = tmp_path / "runs" / "pipeline" / "tiny"

    first = _metakd([*command, "--processes", "2"], tmp_path, tmp_path / "user")
    assert first.returncode == 0, first.stderr[-3000:]
    for i, stage in enumerate(STAGES, start=1):
        assert f"[pipeline] stage {i}/4: {stage} (new)" in first.stdout
        assert (run_dir / stage / "done.json").is_file()
    # The baseline (the user's subclass) trained in a spawned process of its own, beside the teacher.
    assert "student_baseline (new), in a process of its own beside teacher" in first.stdout
    assert "CountingLearner" not in first.stdout
    log = (run_dir / "student_baseline" / "stage.log").read_text()
    assert "CountingLearner trained 3 steps" in log
    for stage in ("teacher", "student_baseline", "distill"):
        saved = yaml.safe_load((run_dir / stage / "config.yaml").read_text())
        assert saved["data"]["init_args"]["cache_dir"] == str(kanji_cache)
        assert list((run_dir / stage).glob("events.out.tfevents.*"))
        marker = read_marker(run_dir, stage)
        assert Path(marker["checkpoint"]).parent == run_dir / stage / "checkpoints"
        assert 0.0 <= marker["test"]["test/acc"] <= 1.0
    distill = yaml.safe_load((run_dir / "distill" / "config.yaml").read_text())
    teacher = read_marker(run_dir, "teacher")
    assert distill["model"]["init_args"]["teacher"] == teacher["checkpoint"]
    assert read_marker(run_dir, "student_baseline")["model_class"] == "my_learners.CountingLearner"
    rows = json.loads((run_dir / "report.json").read_text())
    assert [r["name"] for r in rows] == ["teacher", "distilled student", "baseline student"]
    assert rows[0]["parameters"] > rows[1]["parameters"] == rows[2]["parameters"]
    # The teacher's and the baseline's accuracies were measured beside distill, then reused.
    assert read_marker(run_dir, "report")["prefetched"] == ["teacher", "baseline student"]
    assert not (run_dir / "report_prefetch.pt").exists()
    # The report measures each learner on the same test episodes as its own stage's test.
    assert rows[0]["accuracy"] == pytest.approx(teacher["test"]["test/acc"], abs=1e-6)
    table = (run_dir / "report.md").read_text()
    assert len(table.strip().splitlines()) == 2 + 3 and table in first.stdout
    assert (run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run_dir / "report").glob("events.out.tfevents.*"))

    # Later runs in this process (the same entry point as the command, without its start-up).
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "user"))
    # One stage after another, in this process: the same learners as the two processes trained.
    one = tmp_path / "one_process"
    assert pipeline.pipeline_main([*command[1:], "--run_dir", str(one), "--processes", "1"]) == 0
    assert "in a process of its own" not in capsys.readouterr().out
    sequential = json.loads((one / "report.json").read_text())
    assert [r["accuracy"] for r in sequential] == [r["accuracy"] for r in rows]
    assert read_marker(one, "report")["prefetched"] == []  # measured here, and equal
    assert pipeline.pipeline_main(command[1:]) == 0
    again = capsys.readouterr().out
    assert again.count("skipped (finished; done.json)") == 4
    assert "CountingLearner" not in again and table in again

    (run_dir / "distill" / "done.json").unlink()  # as if distillation had been killed
    assert pipeline.pipeline_main(command[1:]) == 0
    third = capsys.readouterr().out
    assert "teacher skipped" in third and "student_baseline skipped" in third
    assert "distill (not finished)" in third and "report (distill ran again)" in third
    assert read_marker(run_dir, "teacher")["run_id"] == teacher["run_id"]
    assert read_marker(run_dir, "distill")["depends_on"] == {"teacher": teacher["run_id"]}
    same = ("name", "accuracy", "ci95", "parameters", "flops")  # the teacher was not retrained
    new_rows = json.loads((run_dir / "report.json").read_text())
    assert {k: new_rows[0][k] for k in same} == {k: rows[0][k] for k in same}

    # Several teachers: the distill config lists another checkpoint (here the same teacher again),
    # the teacher stage's goes first, and the report has a row per teacher and their ensemble.
    two = yaml.safe_load((QUICKSTART / "distill.yaml").read_text())
    two["model"]["init_args"]["teacher"] = [teacher["checkpoint"]]
    (tmp_path / "distill_two.yaml").write_text(yaml.safe_dump(two))
    config["distill"] = {"config": "distill_two.yaml"}
    path.write_text(yaml.safe_dump(config))
    assert pipeline.pipeline_main(command[1:]) == 0
    fourth = capsys.readouterr().out
    assert "teacher skipped" in fourth and "distill (" in fourth
    saved = yaml.safe_load((run_dir / "distill" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["teacher"] == [teacher["checkpoint"]] * 2
    rows = json.loads((run_dir / "report.json").read_text())
    names = [r["name"] for r in rows]
    assert [n.split(" (")[0] for n in names[:2]] == ["teacher 0", "teacher 1"]
    assert names[2:] == ["ensemble of teachers", "distilled student", "baseline student"]
    for row in rows[:3]:  # identical teachers: each one and their ensemble score as the teacher
        assert row["accuracy"] == pytest.approx(teacher["test"]["test/acc"], abs=1e-6)
    assert rows[2]["parameters"] == 2 * rows[0]["parameters"]
    sys.modules.pop("my_learners", None)


@pytest.mark.slow
def test_fit_picks_up_a_user_subclass(tmp_path, kanji_cache):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "my_learners.py").write_text(USER_MODULE)
    config = yaml.safe_load((QUICKSTART / "student_baseline.yaml").read_text())
    config["model"]["class_path"] = "my_learners.CountingLearner"
    config["model"]["init_args"]["ways"] = 5
    config["data"]["init_args"].update(tiny_data(kanji_cache))
    config["trainer"].update(max_epochs=1, enable_progress_bar=False)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / "subclass.yaml"
    path.write_text(yaml.safe_dump(config))
    fit = _metakd(["fit", "--config", str(path)], tmp_path, tmp_path / "user")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "CountingLearner trained 3 steps" in fit.stdout
    run = tmp_path / "runs" / "kanji-quickstart-student-baseline" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["class_path"] == "my_learners.CountingLearner"
    sys.path.insert(0, str(tmp_path / "user"))
    try:
        from my_learners import CountingLearner

        learner = CountingLearner.load_from_checkpoint(run / "checkpoints" / "best.ckpt")
    finally:
        sys.path.remove(str(tmp_path / "user"))
        sys.modules.pop("my_learners", None)
    assert type(learner).__name__ == "CountingLearner" and learner.learner.ways == 5


# -- progress: what is left, and how long it should take (#15 §9) ------------------------------------
def test_the_time_left_comes_from_earlier_runs_and_step_rates(tmp_path):
    from lightning_metakd.pipeline.run import planned_steps, remaining_estimate

    spec = load_pipeline_config(ROOT / "configs" / "kanji" / "pipeline.yaml", run_dir=tmp_path)
    assert [planned_steps(stage_config(spec, s, "t.ckpt")) for s in STAGES[:3]] == [
        1000, 2400, 1600
    ]  # fmt: skip
    teacher = {"teacher": {"seconds": 60.0, "global_step": 600}}  # 0.1 s per teacher step
    todo = ["student_baseline", "distill", "report"]
    # A teacher's steps say nothing about a student's: no estimate until a student stage ran.
    assert remaining_estimate(spec, todo, teacher, {}) == (
        "still to run: student_baseline, distill, report (no estimate yet)"
    )
    baseline = {**teacher, "student_baseline": {"seconds": 40.0, "global_step": 1600}}
    assert remaining_estimate(spec, todo[1:], baseline, {}) == (
        "about 40 s + ? to go (distill ~40 s, report ?)"
    )
    earlier = {"report": {"seconds": 35.2}, "distill": {"seconds": 95.0}}  # an outdated done.json
    assert remaining_estimate(spec, todo[1:], teacher, earlier) == (
        "about 2 min 10 s to go (distill ~1 min 35 s, report ~35 s)"
    )
    assert remaining_estimate(spec, ["report"], {}, {}) == "still to run: report (no estimate yet)"


def test_stage_tests_false_leaves_the_testing_to_the_report(fake_stages, tmp_path):
    calls, path, run_dir = fake_stages
    path.write_text(path.read_text() + "stage_tests: false\n")
    markers, out = _run(path, run_dir)
    assert calls == list(STAGES)
    assert all(markers[s]["test"] == {} for s in STAGES[:3])
    assert "stage 1/4: teacher done in 0 s: best val/acc 25.00% (the report tests it)" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(path.read_text().replace("stage_tests: false", "stage_tests: no-thanks"))
    with pytest.raises(PipelineConfigError, match="stage_tests must be true or false"):
        load_pipeline_config(bad)


def test_each_finished_stage_prints_the_elapsed_time_and_what_is_left(fake_stages):
    _, path, run_dir = fake_stages
    _, out = _run(path, run_dir)
    lines = [line for line in out.splitlines() if " elapsed; " in line]
    assert len(lines) == 3  # after teacher, baseline and distill; nothing is left after the report
    assert lines[0].endswith("still to run: student_baseline, distill, report (no estimate yet)")
    assert lines[2].endswith("still to run: report (no estimate yet)")
    _, out = _run(path, run_dir)  # every stage is skipped: nothing runs, nothing to estimate
    assert " elapsed; " not in out
