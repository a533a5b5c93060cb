"""The command lines of `metakd`'s own subcommands: help without torch, one flag spelling, one-line
errors, and the progress bar of the report (#15 §5, §6, §9, §11)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from lightning_metakd import command_line
from lightning_metakd.cli import COMMANDS, main
from lightning_metakd.command_line import (
    CommandParser,
    expected_error,
    explain_config_error,
    fail,
    pipeline_parser,
)

ROOT = Path(__file__).resolve().parents[1]
OWN = [name for name, (run, _, _) in COMMANDS.items() if run != "lightning"]
#: Runs `metakd <args>` in a fresh interpreter; prints whether any torch module got imported.
PROBE = """
import sys, time
start = time.perf_counter()
from lightning_metakd.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit_:
    code = exit_.code
seconds = time.perf_counter() - start
torch = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("PROBE", code, len(torch), round(seconds, 3), file=sys.stderr)
"""


def _python(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
    return done, time.perf_counter() - start


@pytest.mark.parametrize("args", [["--help"], *([name, "--help"] for name in OWN)], ids=" ".join)
def test_help_answers_without_importing_torch(args):
    """No torch module is imported (torch alone takes ~2 s, Lightning ~5 s more; the help itself
    ~0.1 s). Not timed here: a wall-clock bound in a test fails on a busy machine."""
    done, _ = _python("-c", PROBE, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    code, torch_modules, _ = done.stderr.split("PROBE ")[1].split()
    assert (code, torch_modules) == ("0", "0")
    assert "usage: metakd" in done.stdout


def test_the_package_root_loads_its_names_on_first_use():
    done, _ = _python(
        "-c",
        "import sys, lightning_metakd as m; print('torch' in sys.modules); "
        "from lightning_metakd import MAML, load_learner; print('torch' in sys.modules, MAML)",
    )
    assert done.stdout.splitlines() == [
        "False",
        "True <class 'lightning_metakd.algorithms.maml.MAML'>",
    ]
    import lightning_metakd

    for name in lightning_metakd.__all__:
        assert getattr(lightning_metakd, name) is not None
    assert set(lightning_metakd.__all__) <= set(dir(lightning_metakd))
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        lightning_metakd.Nope  # noqa: B018


def test_the_renderers_load_without_torch_and_the_data_names_on_first_use():
    """The processes that render the KanjiVG cache import only NumPy and Pillow (they start in
    a fraction of a second, not the ~5 s torch and Lightning take); the data package's public
    names and submodules still read as after an eager import."""
    done, _ = _python(
        "-c",
        "import sys; import lightning_metakd.data.kanji_render, lightning_metakd.data.kanji_simple, "
        "lightning_metakd.data.kanji_handwriting; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning'})); "
        "from lightning_metakd.data import KanjiDataModule; print(KanjiDataModule.__module__)",
    )
    assert done.stdout.splitlines() == ["[]", "lightning_metakd.data.kanji"], done.stderr[-2000:]
    import lightning_metakd.data as data

    for name in data.__all__:
        assert getattr(data, name).__name__ == name
    assert set(data.__all__) <= set(dir(data))
    assert data.kanji_render.__name__ == "lightning_metakd.data.kanji_render"  # a submodule
    with pytest.raises(AttributeError, match="'lightning_metakd.data' has no attribute 'Nope'"):
        data.Nope  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute '__wrapped__'"):
        data.__wrapped__  # noqa: B018


def test_report_help_prints_percent_signs_once(capsys):
    assert main(["report", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Accuracy ± 95% CI" in " ".join(out.split()) and "%%" not in out


# -- one spelling of a flag ----------------------------------------------------------------------------
def test_hyphenated_flags_still_work_with_a_deprecation_note(capsys):
    opts = pipeline_parser().parse_args(["--config", "p.yaml", "--run-dir", "runs/x"])
    assert opts.run_dir == "runs/x"
    assert capsys.readouterr().err == (
        "metakd pipeline: note: --run-dir is deprecated; use --run_dir.\n"
    )
    parser = command_line.episodes_parser()
    opts = parser.parse_args(["--meta-batch-size=4", "--num_workers", "1"])
    assert (opts.meta_batch_size, opts.num_workers) == (4, 1)
    assert "--meta-batch-size is deprecated; use --meta_batch_size." in capsys.readouterr().err
    with pytest.raises(SystemExit):  # after "--" nothing is rewritten: an unknown argument
        parser.parse_args(["--", "--cache-dir"])


def test_every_flag_of_the_own_commands_is_spelt_with_underscores():
    for name in OWN:
        parser = getattr(command_line, f"{name}_parser")()
        flags = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
        assert flags and all("-" not in f[2:] for f in flags), (name, flags)


def test_a_command_parser_accepts_its_own_hyphenated_flags_unchanged(capsys):
    parser = CommandParser(prog="demo")
    parser.add_argument("--dry-run", action="store_true")  # a flag spelt with a hyphen on purpose
    assert parser.parse_args(["--dry-run"]).dry_run is True
    assert capsys.readouterr().err == ""


# -- one-line errors -------------------------------------------------------------------------------------
NESTED = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lightning_metakd.modules.MetaLearnerModule':
        Parser key "backbone":
          Problem with given class_path 'lightning_metakd.models.Conv4':
            Option 'hiden' is not accepted
    - Expected a <class 'NoneType'>
  Given value type: <class 'dict'>
  Given value: {'class_path': 'lightning_metakd.modules.MetaLearnerModule'}"""


@pytest.mark.parametrize(
    ("message", "keys", "line"),
    [
        (NESTED, [], "model.init_args.backbone.init_args.hiden: lightning_metakd.models.Conv4 "
         "takes no argument 'hiden'; did you mean 'hidden'?"),
        ("Parser key \"model\":\n  Errors:\n    - Problem with given class_path "
         "'lightning_metakd.modules.MetaLearnerModule':\n        Parser key \"algorithm\":\n"
         "          - Problem with given class_path 'lightning_metakd.algorithms.ProtoNt':\n"
         "            module 'lightning_metakd.algorithms' has no attribute 'ProtoNt'",
         [], "model.init_args.algorithm: module 'lightning_metakd.algorithms' has no attribute "
         "'ProtoNt'; did you mean 'ProtoNet'?"),
        ("Parser key \"data\":\n  Errors:\n    - Problem with given class_path "
         "'conftest.TinyDataModule':\n        Parser key \"ways\":\n"
         "          Expected a <class 'int'>. Got value: five",
         [], "data.init_args.ways: Expected a <class 'int'>. Got value: five"),
        ("Subcommand 'fit' does not accept option 'trainer.max_epoch'", ["trainer.max_epochs"],
         "unknown option 'trainer.max_epoch'; did you mean 'trainer.max_epochs'?"),
        ('Parser key "config": File does not exist: \'nope.yaml\'', [],
         "config: File does not exist: 'nope.yaml'"),
    ],
    ids=["nested key", "class name", "type", "trainer flag", "missing file"],
)  # fmt: skip
def test_config_errors_become_one_line_with_a_suggestion(message, keys, line):
    assert explain_config_error(message, keys) == line


def test_a_misspelt_key_of_a_kwargs_subclass_suggests_its_bases_arguments():
    message = (
        "Problem with given class_path 'conftest.TinyDataModule':\n  Option 'shot' is not accepted"
    )
    assert explain_config_error(message) == (
        "init_args.shot: conftest.TinyDataModule takes no argument 'shot'; did you mean 'shots'?"
    )


def _raise(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as err:  # noqa: BLE001 - the test wants the raised object
        return err


def test_only_our_own_messages_and_missing_files_are_expected_mistakes():
    ours = _raise(ValueError("ways must be at least 2, got 1."))  # raised in this test: not ours
    assert expected_error(ours) is None
    from lightning_metakd.algorithms import Learner, ProtoNet
    from lightning_metakd.models import Conv4

    try:
        Learner(Conv4(), ProtoNet(), ways=1)
    except ValueError as err:
        library = err
    wrapped = _raise_from(
        ValueError("Does not validate against any of the Union subtypes"), library
    )
    assert expected_error(wrapped) is library
    missing = _raise(FileNotFoundError(2, "No such file or directory", "x.yaml"))
    assert expected_error(missing) is missing


def _raise_from(error: BaseException, cause: BaseException) -> BaseException:
    try:
        raise error from cause
    except BaseException as err:  # noqa: BLE001
        return err


def test_fail_prints_one_line_or_raises_with_traceback(capsys, monkeypatch):
    error = _raise(KeyError("reference 'x' is not one of the learners ['a']."))
    assert fail("metakd report", error) == 2
    assert capsys.readouterr().err == (
        "metakd report: error: reference 'x' is not one of the learners ['a'].\n"
    )
    with pytest.raises(KeyError):  # a KeyError of someone else's, under an `except Exception`
        fail("metakd report", error, catch_all=True)
    monkeypatch.setenv("METAKD_TRACEBACK", "1")
    with pytest.raises(KeyError):
        fail("metakd report", error)


def test_traceback_flag_shows_the_trace_and_leaves_the_environment_alone(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert main(["pipeline", "--config", missing]) == 2
    assert capsys.readouterr().err == (
        f"metakd pipeline: error: The pipeline config '{missing}' does not exist.\n"
    )
    with pytest.raises(ValueError, match="does not exist"):
        main(["pipeline", "--config", missing, "--traceback"])
    assert "METAKD_TRACEBACK" not in os.environ


# -- parsers pinned to what they describe ------------------------------------------------------------
def test_the_finetune_parser_is_run_finetunes_signature_and_documentation():
    from docstring_parser import parse

    from lightning_metakd.deploy import run_finetune

    ours = inspect.signature(command_line.finetune_arguments).parameters
    theirs = dict(inspect.signature(run_finetune).parameters)
    theirs.pop("echo")
    assert [(p.name, p.default) for p in ours.values()] == [
        (p.name, p.default) for p in theirs.values()
    ]
    hints, their_hints = map(typing.get_type_hints, (command_line.finetune_arguments, run_finetune))
    assert {k: hints[k] for k in ours} == {k: their_hints[k] for k in ours}
    docs = {p.arg_name: " ".join(p.description.split()) for p in parse(run_finetune.__doc__).params}
    ours_docs = parse(command_line.finetune_arguments.__doc__).params
    assert {p.arg_name: " ".join(p.description.split()) for p in ours_docs} == {
        k: v for k, v in docs.items() if k != "echo"
    }


def test_the_export_formats_are_the_deploy_packages():
    from lightning_metakd.deploy.predict import FORMATS

    assert command_line.FORMATS == FORMATS


# -- progress of the report ------------------------------------------------------------------------------
def test_the_report_counts_learners_times_episodes(capsys):
    from conftest import TinyDataModule

    from lightning_metakd.report.command import episode_progress

    dm = TinyDataModule(ways=3, shots=1, queries=2, image_size=8, test_episodes=6)
    dm.setup("test")
    with episode_progress(dm, learners=2, desc="report"):
        tasks = [sum(len(b.support_x) for b in dm.test_dataloader()) for _ in range(2)]
    assert tasks == [6, 6]
    err = capsys.readouterr().err
    assert "report: 100%" in err and "| 12/12 [" in err
    assert dm.test_dataloader.__func__ is TinyDataModule.test_dataloader  # put back
