"""The comparison report: accuracy, size, FLOPs and latency of learners on the same test episodes.

:func:`compare` answers the question distillation is for — how much accuracy does a smaller
student keep for how much less compute — with every learner measured on the same fixed test
episodes; :func:`ablation` formats a table of distillation runs (each loss term alone, all
together) from their results. :func:`distillation_learners` names the rows of a distillation run:
the teacher and the distilled student or, with several teachers, each teacher, their ensemble
(:class:`~lightning_metakd.modules.distillation.TeacherEnsemble`) and the student.

Because every learner answers the same episodes, "B beats A" is a *paired* question: per test
episode the accuracy difference ``acc_B − acc_A``, then its mean ± 95% CI. The episodes' own
difficulty moves both accuracies together and cancels in the difference, so its CI is much
narrower than the two learners' CIs: two learners whose CIs overlap can still differ
significantly. :func:`compare` reports that difference against a reference learner.

Example::

    rows = compare({"teacher": teacher, "student": distiller.student_learner()}, datamodule, "out")
    rows = compare(distillation_learners(distiller, baseline), datamodule, "out")
    print(open("out/report.md").read())
"""

from lightning_metakd.report.command import report_datamodule, report_main
from lightning_metakd.report.comparison import (
    COLUMNS,
    Measured,
    checkpoint_learners,
    compare,
    distillation_learners,
    measure,
)
from lightning_metakd.report.tables import ablation, markdown_table

__all__ = [
    "COLUMNS",
    "Measured",
    "ablation",
    "checkpoint_learners",
    "compare",
    "distillation_learners",
    "markdown_table",
    "measure",
    "report_datamodule",
    "report_main",
]
