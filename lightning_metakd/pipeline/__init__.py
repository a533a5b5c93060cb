"""``metakd pipeline``: teacher → baseline student → distilled student → report, resumable.

A pipeline YAML names three LightningCLI stage configs and the overrides to apply to them::

    name: kanji-quickstart                  # run folder: runs/pipeline/<name> (or run_dir: ...)
    threads: 1                              # torch.set_num_threads for every stage (optional)
    processes: 2                            # stages that may train at once (default 1)
    stage_tests: false                      # leave testing to the report (default true)
    overrides:                              # applied to every training stage (dotted or nested)
      data.init_args.num_workers: 0
    teacher:          {config: quickstart/teacher.yaml}           # a MetaLearnerModule config
    student_baseline: {config: quickstart/student_baseline.yaml}  # the student, no teacher
    distill:          {config: quickstart/distill.yaml,           # a DistillationModule config
                       overrides: {trainer.max_epochs: 3}}
    report: {warmup: 2, repeats: 10}        # data: {...} overrides the report's test episodes

Stage config paths are relative to the pipeline YAML. The stages run in this order:

1. ``teacher``: fit, then test the best checkpoint (``stage_tests: false``: no test; the report
   measures every learner on the distill stage's test episodes anyway).
2. ``student_baseline``: the student's backbone and algorithm meta-trained without distillation.
3. ``distill``: a :class:`~lightning_metakd.modules.DistillationModule` whose ``teacher`` is set to
   the teacher stage's best checkpoint; fit, then test. Several teachers: when the distill config's
   ``teacher`` is a list of checkpoints, the teacher stage's checkpoint is put first and the
   listed ones follow it (``teacher_weights``, if given, then has one weight per teacher).
4. ``report``: :func:`lightning_metakd.report.compare` of the teacher(s) — with several, each one
   and their ensemble (:func:`lightning_metakd.report.distillation_learners`) — the distilled
   student (``student_learner()``) and the baseline student on the same fixed test episodes (the
   distill stage's data), written to ``<run>/report.{json,md,png}`` and printed as a Markdown
   table.

Optional, only when the pipeline YAML has a ``finetune:`` section (then it runs after
``distill``): ``finetune`` adapts the distilled student to the classes of a folder of class
folders and writes ``<run>/finetune/{classifier.pt,finetune.json}``
(:func:`lightning_metakd.deploy.run_finetune`; the section holds its arguments, ``data_root``
required, e.g. ``finetune: {data_root: runs/my_kanji, holdout: 2, epochs: 20}``). It depends on
``distill`` and reruns when the section or the files under ``data_root`` change.

With ``processes: 2`` (or ``--processes 2``) a training stage that is ready while another one
runs trains beside it in a spawned process of its own (:class:`~lightning_metakd.pipeline.run.
BackgroundStage`), its output in ``<run>/<stage>/stage.log``: in this pipeline the baseline
student beside the teacher and then the distilled student, which on two cores takes the
baseline off the pipeline's wall-clock. The results are those of running one stage after another
(each stage seeds itself); a stage started while another renders the KanjiVG cache waits for it.

Each training stage goes through the ``metakd`` LightningCLI (:func:`~lightning_metakd.lightning_cli.
run_lightning_cli` with ``run=False``, then ``trainer.fit`` and ``trainer.test`` on the same
Trainer), so ``class_path`` names any module or data module, users' subclasses included. Its
folder ``<run>/<stage>/`` holds ``stage_config.yaml`` (what was passed to the CLI),
``config.yaml`` (the full resolved config, loadable with ``metakd fit --config``), the TensorBoard
events, ``checkpoints/{best,last}.ckpt`` and, once the stage has finished, ``done.json`` (its
results, written atomically). A stage with a ``done.json`` is skipped when the pipeline runs
again, unless ``--force`` is given, its input config changed, or a stage it depends on ran again
(``distill`` depends on ``teacher``; ``report`` on all three). A stage killed half-way has no
``done.json``; its folder is cleared and it runs again. Delete ``<run>/<stage>/done.json`` to rerun
a stage and the stages that depend on it.

Example::

    metakd pipeline --config configs/kanji/pipeline.yaml            # ~2-3 min on a 2-core CPU
    metakd pipeline --config configs/kanji/pipeline.yaml --force    # rerun every stage
    tensorboard --logdir runs/pipeline
"""

from lightning_metakd.pipeline.config import (
    DEPENDS_ON,
    OPTIONAL_STAGES,
    STAGES,
    PipelineConfigError,
    PipelineSpec,
    StageSpec,
    expand_dotted,
    load_pipeline_config,
    merge_config,
    pipeline_stages,
    stage_config,
)
from lightning_metakd.pipeline.run import (
    pipeline_main,
    read_marker,
    run_pipeline,
    write_json_atomic,
)

__all__ = [
    "DEPENDS_ON",
    "OPTIONAL_STAGES",
    "STAGES",
    "PipelineConfigError",
    "PipelineSpec",
    "StageSpec",
    "expand_dotted",
    "load_pipeline_config",
    "merge_config",
    "pipeline_main",
    "pipeline_stages",
    "read_marker",
    "run_pipeline",
    "stage_config",
    "write_json_atomic",
]
