"""Running a pipeline: which stages are finished (``done.json`` markers), what to rerun, and the
``metakd pipeline`` command."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightning_metakd.atomic import atomic_write
from lightning_metakd.command_errors import UsageError, fail
from lightning_metakd.command_line import pipeline_parser
from lightning_metakd.pipeline import stages
from lightning_metakd.pipeline.config import (
    DEPENDS_ON,
    MARKER,
    TRAINING_STAGES,
    PipelineConfigError,
    PipelineSpec,
    _digest,
    _folder_fingerprint,
    load_pipeline_config,
    merge_config,
    pipeline_stages,
    stage_config,
)


# -- markers ----------------------------------------------------------------------------------------
def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` atomically (see :func:`lightning_metakd.atomic.atomic_write`)."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def read_marker(run_dir: Path, stage: str) -> dict[str, Any] | None:
    """The ``done.json`` of ``stage`` in ``run_dir``, or ``None`` if it is missing or unreadable."""
    path = run_dir / stage / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("stage") == stage else None


# -- the pipeline -----------------------------------------------------------------------------------
def _rerun_reason(
    stage: str,
    marker: Mapping[str, Any] | None,
    inputs: str,
    rerun: set[str],
    force: bool,
    started: bool = True,
) -> str | None:
    """Why ``stage`` must run, or ``None`` when its finished result can be kept.

    ``started``: the stage's folder exists, so a stage without a marker was interrupted ("not
    finished") rather than never run ("new").
    """
    if force:
        return "--force"
    if marker is None:
        return "not finished" if started else "new"
    if marker.get("inputs") != inputs:
        return "its config changed"
    changed = [dep for dep in DEPENDS_ON[stage] if dep in rerun]
    if changed:
        return f"{' and '.join(changed)} ran again"
    return None


def duration(seconds: float) -> str:
    """``"45 s"``, ``"2 min 05 s"``, ``"1 h 02 min"``.

    Example:
        >>> duration(44.6), duration(125), duration(3720)
        ('45 s', '2 min 05 s', '1 h 02 min')
    """
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def planned_steps(config: Mapping[str, Any]) -> int | None:
    """The optimisation steps a stage config asks for (``max_steps``, or epochs × steps per epoch)."""
    trainer = config.get("trainer") or {}
    data = (config.get("data") or {}).get("init_args") or {}
    max_steps, epochs, per_epoch = (
        trainer.get("max_steps"),
        trainer.get("max_epochs"),
        data.get("steps_per_epoch"),
    )
    if isinstance(max_steps, int) and max_steps > 0:
        return max_steps
    if isinstance(epochs, int) and isinstance(per_epoch, int):
        return epochs * per_epoch
    return None


#: The training stages whose seconds per step estimate a stage's: those of the same network.
SAME_LEARNER: dict[str, tuple[str, ...]] = {
    "teacher": (),
    "student_baseline": ("distill",),
    "distill": ("student_baseline",),
}


def remaining_estimate(
    spec: PipelineSpec,
    todo: list[str],
    markers: Mapping[str, Mapping[str, Any]],
    earlier: Mapping[str, Mapping[str, Any] | None],
) -> str:
    """``"about 2 min 10 s to go (distill ~1 min 30 s, report ~40 s)"`` for the stages ``todo``.

    A stage that ran before (an outdated ``done.json``) is expected to take as long again; a
    training stage that never ran takes its planned steps (:func:`planned_steps`) at the seconds
    per step of a finished stage that trains the same network (the baseline and the distilled
    student: :data:`SAME_LEARNER`; a teacher's steps say little about a student's); else its time
    is unknown (``?``).
    """
    parts, total, unknown = [], 0.0, False
    for stage in todo:
        seconds = (earlier.get(stage) or {}).get("seconds")
        ran = [
            markers[s] for s in SAME_LEARNER.get(stage, ()) if markers.get(s, {}).get("global_step")
        ]
        rate = sum(m["seconds"] for m in ran) / sum(m["global_step"] for m in ran) if ran else None
        if seconds is None and rate is not None and stage in TRAINING_STAGES:
            steps = planned_steps(_read_stage_config(spec, stage))
            seconds = None if steps is None else rate * steps
        if seconds is None:
            unknown = True
            parts.append(f"{stage} ?")
        else:
            total += seconds
            parts.append(f"{stage} ~{duration(seconds)}")
    if unknown and not total:
        return f"still to run: {', '.join(todo)} (no estimate yet)"
    lead = f"about {duration(total)}{' + ?' if unknown else ''} to go"
    return f"{lead} ({', '.join(parts)})"


def _read_stage_config(spec: PipelineSpec, stage: str) -> dict[str, Any]:
    try:
        return stage_config(spec, stage, teacher_checkpoint="(the teacher stage's)")
    except (OSError, ValueError):
        return {}


def _will_run(
    stage: str, earlier: Mapping[str, Any], ran: set[str], force: bool, order: tuple[str, ...]
) -> bool:
    """Whether ``stage`` is expected to run: forced, never finished, or an input stage runs."""
    if force or earlier.get(stage) is None:
        return True
    return any(
        dep in ran or (dep in order and _will_run(dep, earlier, ran, force, order))
        for dep in DEPENDS_ON[stage]
    )


class BackgroundStage:
    """Work of the pipeline in a spawned process of its own, beside the pipeline's (``processes``
    above 1): a training stage (:meth:`training`, its output in ``<run>/<stage>/stage.log``) or
    the report's early measurements.

    Spawned, not forked (forking beside torch's threads is unsafe); the process sets the
    pipeline's ``threads`` and runs ``work(*args)`` (a top-level function), its output to ``log``.
    The KanjiVG cache's file lock makes a stage that starts while another renders wait for it.
    """

    def __init__(
        self,
        stage: str,
        work: Callable[..., dict[str, Any]],
        args: tuple,
        log: Path,
        threads: int | None,
    ):
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.stage, self.log = stage, log
        self._results, sender = context.Pipe(duplex=False)
        body = (sender, work, args, threads, str(log))
        self._process = context.Process(target=_stage_process, args=body, name=f"metakd-{stage}")
        self._process.start()
        sender.close()  # only the child writes: the parent sees EOFError if it dies silently

    @classmethod
    def training(
        cls, stage: str, config: dict[str, Any], stage_dir: Path, test: bool, threads: int | None
    ) -> BackgroundStage:
        """The training ``stage`` (:func:`~lightning_metakd.pipeline.stages.run_training_stage`)."""
        args = (stage, config, stage_dir, test)
        return cls(stage, stages.run_training_stage, args, stage_dir / "stage.log", threads)

    def done(self) -> bool:
        """Whether the stage has finished (or its process ended)."""
        return self._results.poll() or not self._process.is_alive()

    def result(self) -> tuple[dict[str, Any], float]:
        """Wait for the stage; its marker fields and the seconds it took in its process.

        Raises:
            RuntimeError: the stage failed (its error and the log to read) or its process died.
        """
        try:
            status, payload, seconds = self._results.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(
                f"the {self.stage} stage's process ended with exit code {self._process.exitcode} "
                f"before it finished; its output is in {self.log}."
            ) from None
        self._process.join()
        if status != "ok":
            raise RuntimeError(f"the {self.stage} stage failed: {payload} (its output: {self.log})")
        return payload, seconds

    def stop(self) -> None:
        """End the stage's process (the pipeline failed elsewhere); its folder has no done.json."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()


def _stage_process(sender, work, args, threads, log) -> None:
    """The body of a :class:`BackgroundStage`'s process: ``work(*args)``, its output to ``log``."""
    import sys
    import traceback

    with open(log, "w", buffering=1) as out:
        sys.stdout = sys.stderr = out
        try:
            if threads is not None:
                import torch

                torch.set_num_threads(threads)
            began = time.perf_counter()
            result = work(*args)
            sender.send(("ok", result, time.perf_counter() - began))
        except BaseException as err:  # noqa: BLE001 - reported to the pipeline, which raises it
            traceback.print_exc()
            sender.send(("error", f"{type(err).__name__}: {err}", 0.0))


def _start_prefetch(
    spec: PipelineSpec, distill_config: Mapping[str, Any], markers: Mapping[str, Mapping[str, Any]]
) -> BackgroundStage | None:
    """Measure the finished teacher's and baseline's report accuracies in a second process while
    the distilled student trains (:func:`~lightning_metakd.pipeline.stages.
    prefetch_report_accuracies`); ``None`` if neither has finished."""
    checkpoints = [
        markers[s]["checkpoint"]
        for s in ("teacher", "student_baseline")
        if s in markers and markers[s].get("checkpoint")
    ]
    if not checkpoints:
        return None
    data = merge_config(distill_config.get("data") or {}, spec.report.get("data") or {})
    out = spec.run_dir / stages.PREFETCH_FILE
    out.unlink(missing_ok=True)
    return BackgroundStage(
        "report prefetch",
        stages.prefetch_report_accuracies,
        (data, checkpoints, out),
        out.with_suffix(".log"),
        spec.threads,
    )


def _finish_prefetch(prefetch: BackgroundStage, say: Callable[[str], None]) -> None:
    """Wait for the prefetch; a failed one only means the report measures everything itself."""
    try:
        prefetch.result()
    except RuntimeError as err:
        say(f"[pipeline] the report measures every learner itself ({err})")


def _stage_inputs(
    spec: PipelineSpec, stage: str, markers: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """What ``stage`` runs on, once the stages it depends on have finished (digested for reruns)."""
    if stage == "report":
        return {"report": spec.report}
    if stage == "finetune":
        finetune = {**(spec.finetune or {}), "checkpoint": markers["distill"]["checkpoint"]}
        return {"finetune": finetune, "files": _folder_fingerprint(finetune["data_root"])}
    teacher = markers["teacher"]["checkpoint"] if stage == "distill" else None
    return stage_config(spec, stage, teacher)


def _done_summary(marker: Mapping[str, Any]) -> str:
    """``": best val/acc 85.92% (the report tests it)"`` and the like, for a stage's done line."""
    test = marker.get("test", {})
    if marker.get("holdout_accuracy") is not None:
        return (
            f": held-out accuracy {100 * marker['holdout_accuracy']:.2f}% "
            f"({marker['holdout_images']} images)"
        )
    if "test/acc" in test:
        return (
            f": test/acc {100 * test['test/acc']:.2f} ± {100 * test.get('test/acc_ci95', 0):.2f}%"
        )
    if marker.get("best_val_acc") is not None:
        return f": best val/acc {100 * marker['best_val_acc']:.2f}% (the report tests it)"
    return ""


def run_pipeline(
    spec: PipelineSpec,
    force: bool = False,
    echo: Callable[[str], None] | None = None,
    processes: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the stages of ``spec`` that are not finished; returns every stage's marker.

    Stages start in :func:`pipeline_stages` order as soon as the stages they depend on
    (:data:`DEPENDS_ON`) have finished. With one process they run one after another in this
    one; with ``processes`` N > 1, up to N - 1 training stages that are ready while another one
    runs here train beside it, each in a :class:`BackgroundStage` (in the quickstart: the
    baseline student beside the teacher and the distilled student).

    Args:
        spec: from :func:`load_pipeline_config`.
        force: rerun every stage.
        echo: where progress lines go (default: print to stdout, flushed).
        processes: overrides ``spec.processes``.
    """
    say = echo or (lambda line: print(line, flush=True))
    processes = spec.processes if processes is None else processes
    if spec.threads is not None:
        import torch

        torch.set_num_threads(spec.threads)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    say(f"[pipeline] {spec.name}: run folder {spec.run_dir}")
    start = time.perf_counter()
    markers: dict[str, dict[str, Any]] = {}
    rerun: set[str] = set()
    order = pipeline_stages(spec)
    number = {stage: f"{i}/{len(order)}" for i, stage in enumerate(order, start=1)}
    earlier = {stage: read_marker(spec.run_dir, stage) for stage in order}
    pending: list[str] = list(order)
    configs: dict[str, dict[str, Any]] = {}  # what each stage runs on, built once it is ready
    inputs: dict[str, str] = {}  # their digests
    beside: dict[str, BackgroundStage] = {}
    prefetch: BackgroundStage | None = None  # the report's early measurements, beside distill

    def finish(stage: str, result: dict[str, Any], seconds: float) -> None:
        marker = {
            "stage": stage,
            "run_id": uuid.uuid4().hex,
            "inputs": inputs[stage],
            "depends_on": {dep: markers[dep]["run_id"] for dep in DEPENDS_ON[stage]},
            "seconds": round(seconds, 1),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            **result,
        }
        write_json_atomic(spec.run_dir / stage / MARKER, marker)
        markers[stage] = marker
        rerun.add(stage)
        say(
            f"[pipeline] stage {number[stage]}: {stage} done in {marker['seconds']:.0f} s"
            f"{_done_summary(marker)}"
        )
        todo = [s for s in pending if _will_run(s, earlier, rerun, force, order)]
        if todo:
            running = (
                f"; {' and '.join(beside)} still training in its own process" if beside else ""
            )
            say(
                f"[pipeline] {duration(time.perf_counter() - start)} elapsed; "
                f"{remaining_estimate(spec, todo, markers, earlier)}{running}"
            )

    def collect(stage: str) -> None:
        finish(stage, *beside.pop(stage).result())

    def must_run(stage: str) -> str | None:
        """Why ``stage`` runs; ``None`` once it is skipped (its finished marker kept)."""
        stage_dir = spec.run_dir / stage
        if stage not in configs:  # a ready stage's inputs are final: its dependencies finished
            configs[stage] = _stage_inputs(spec, stage, markers)
            inputs[stage] = _digest(configs[stage])
        marker = read_marker(spec.run_dir, stage)
        reason = _rerun_reason(stage, marker, inputs[stage], rerun, force, stage_dir.is_dir())
        if reason is None:
            say(f"[pipeline] stage {number[stage]}: {stage} skipped (finished; {MARKER})")
            markers[stage] = marker  # type: ignore[assignment]
            pending.remove(stage)
        return reason

    def begin(stage: str) -> Path:
        pending.remove(stage)
        stage_dir = spec.run_dir / stage
        if stage_dir.exists():
            shutil.rmtree(stage_dir)  # a half-written or outdated stage starts clean
        stage_dir.mkdir(parents=True)  # from now on a missing done.json means "not finished"
        return stage_dir

    try:
        while pending or beside:
            for stage in [s for s in beside if beside[s].done()]:
                collect(stage)
            ready = [s for s in pending if all(dep in markers for dep in DEPENDS_ON[s])]
            if not ready:  # what is left needs a stage that runs beside
                stage = next(iter(beside))
                say(f"[pipeline] waiting for {stage} (its output: {beside[stage].log})")
                collect(stage)
                continue
            free = processes - 1 - len(beside)
            candidates = ready if free > 0 else ready[:1]
            runs = [(s, r) for s in candidates if (r := must_run(s))]
            if len(runs) < len(candidates):
                continue  # some were skipped: the stages that depend on them may be ready now
            (stage, reason), others = runs[0], runs[1:]
            stage_dir = begin(stage)
            say(f"[pipeline] stage {number[stage]}: {stage} ({reason})")
            for other, why in [(s, r) for s, r in others if s in TRAINING_STAGES][:free]:
                beside[other] = BackgroundStage.training(
                    other, configs[other], begin(other), spec.stage_tests, spec.threads
                )
                say(
                    f"[pipeline] stage {number[other]}: {other} ({why}), in a process of its own "
                    f"beside {stage}; its output: {beside[other].log}"
                )
            if stage == "distill" and "report" in pending and processes - 1 - len(beside) > 0:
                prefetch = _start_prefetch(spec, configs[stage], markers)
            if stage == "report" and prefetch is not None:
                _finish_prefetch(prefetch, say)
                prefetch = None
            began = time.perf_counter()
            if stage == "report":
                result = stages.run_report_stage(spec, markers)
            elif stage == "finetune":
                result = stages.run_finetune_stage(configs[stage], stage_dir, say)
            else:
                result = stages.run_training_stage(
                    stage, configs[stage], stage_dir, spec.stage_tests
                )
            finish(stage, result, time.perf_counter() - began)
    finally:
        for background in [*beside.values(), *([prefetch] if prefetch else [])]:
            background.stop()
    report = spec.run_dir / "report.md"
    say(f"[pipeline] report: {report}")
    say(report.read_text() if report.is_file() else "(report.md is missing)")
    say(
        f"[pipeline] finished in {duration(time.perf_counter() - start)}; "
        f"TensorBoard: tensorboard --logdir {spec.run_dir}"
    )
    return markers


def pipeline_main(argv: list[str]) -> int:
    """``metakd pipeline``: parse the flags (:func:`~lightning_metakd.command_line.pipeline_parser`)
    and run :func:`run_pipeline`; a config mistake or a library error is one line, exit status 2."""
    opts = pipeline_parser().parse_args(argv)
    try:
        spec = load_pipeline_config(opts.config, opts.run_dir)
        if opts.processes is not None and opts.processes < 1:
            raise PipelineConfigError(
                f"--processes must be a positive integer (1 runs the stages one after another), "
                f"got {opts.processes}."
            )
    except PipelineConfigError as err:
        return fail("metakd pipeline", err)
    try:
        run_pipeline(spec, force=opts.force, processes=opts.processes)
    except UsageError as err:  # a stage config the LightningCLI cannot parse
        return fail("metakd pipeline", err)
    except Exception as err:  # noqa: BLE001 - fail() re-raises everything but expected mistakes
        return fail("metakd pipeline", err, catch_all=True)
    return 0
