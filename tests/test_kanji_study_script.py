"""``scripts/kanji_study.py``'s budget margins: at every validation of an arm, its accuracy minus
the best the twin had reached by the same budget (issue #13's "above the twin at every budget")."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kanji_study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("kanji_study_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


# (budget, step, validation accuracy): the twin rises slowly, the distilled arm fast, then ties.
TWIN = [(1.0, 0, 0.50), (2.0, 0, 0.70), (3.0, 0, 0.90), (4.0, 0, 0.95)]
ARM = [(0.5, 0, 0.75), (2.5, 0, 0.875), (4.0, 0, 0.875)]


def test_margins_take_the_best_twin_by_each_budget(study):
    found = study.margins_at(ARM, TWIN)
    # At 0.5 the twin has not validated yet: its first validation counts; at 2.5 its best is 0.70
    # (the 0.90 of budget 3 is later); at 4.0 its best is 0.95.
    assert [t for t, _ in found] == [0.5, 2.5, 4.0]
    assert [m for _, m in found] == pytest.approx([0.25, 0.175, -0.075])


def test_budget_margins_summarise_per_seed_and_say_whether_above_everywhere(study):
    curves = {"twin": {0: TWIN, 1: TWIN}, "arm": {0: ARM, 1: ARM[:2]}}
    found = study.budget_margins(curves, "arm", "twin")
    assert found["0"]["min_margin"] == pytest.approx(-0.075)
    assert found["0"]["mean_margin"] == pytest.approx((0.25 + 0.175 - 0.075) / 3)
    assert found["0"]["above_everywhere"] is False
    assert found["1"]["above_everywhere"] is True  # stopped at 2.5, before the twin caught up
    assert found["1"]["arm_seconds"] == 2.5 and found["1"]["reference_best"] == 0.95


def test_envelope_is_the_best_of_several_twins(study):
    other = [(1.5, 0, 0.80), (3.5, 0, 0.85)]
    best = study.envelope({"a": {0: TWIN}, "b": {0: other}}, ["a", "b"])
    margins = study.margins_at(ARM, best[0])
    assert [m for _, m in margins] == pytest.approx([0.25, 0.075, -0.075])  # 0.80 by 2.5


def test_axis_labels_are_wrapped_to_fit(study):
    label = study.wrap("word " * 40, 30)
    assert all(len(line) <= 30 for line in label.splitlines()) and label.count("\n") >= 5


def test_spread_places_a_runs_cost_as_its_wall_time_went(study):
    # a cold first epoch took 30 s, the next two 10 s each: of a 6-twin-epoch cost, 3.6 comes first
    found = study.spread([(30.0, 1, 0.5), (40.0, 2, 0.6), (50.0, 3, 0.7)], 6.0)
    assert [t for t, _, _ in found] == pytest.approx([3.6, 4.8, 6.0])
    assert [(s, a) for _, s, a in found] == [(1, 0.5), (2, 0.6), (3, 0.7)]


def test_the_patient_study_distils_on_stored_views_against_the_twin(study):
    patient = study.STUDIES["patient"]
    arms = {a.key: a for a in patient.arms}
    views = arms["distilled-views-48"]
    assert views.config == "distill_protonet_augmented.yaml"
    assert views.overrides["data.init_args.train_views"] == study.STORED_VIEWS
    assert study.max_epochs(patient, views) == 48
    assert study.max_epochs(patient, arms["twin-96"]) == 96
    assert study.twin_arms(patient) == ["twin-96"]
    assert "distilled-64" in arms  # the same teacher, without views
    early = arms["distilled-early-90"]  # early-stopped distillation within the twin's compute
    assert early.overrides["model.init_args.knowledge_epochs"] == 8
    assert study.max_epochs(patient, early) == 90


class _Run:
    def __init__(self, seed, seconds):
        self.seed, self.marker = seed, {"seconds": seconds}


class _Runs:
    def __init__(self, *runs):
        self.runs = list(runs)


def test_the_patient_study_costs_each_arm_by_its_own_epochs(study):
    patient = study.STUDIES["patient"]
    assert patient.cost_per_arm and patient.cost_pair == ("distilled-views-48", "twin-96")
    # per epoch: twin 10 s, distilled-64 12.5 s, distilled on views 15 / 17 s
    runs = {
        "twin-96": _Runs(_Run(0, 960.0), _Run(1, 960.0)),
        "distilled-64": _Runs(_Run(0, 800.0)),
        "distilled-views-48": _Runs(_Run(0, 720.0), _Run(1, 816.0)),
    }
    cost = study.epoch_cost(patient, runs)
    assert cost == pytest.approx({"twin-96": 1.0, "distilled-64": 1.25, "distilled-views-48": 1.6})
    equal = study.STUDIES["equal"]  # one ratio, the cost pair's, for the arms of its config
    found = study.epoch_cost(
        equal, {"twin-96": runs["twin-96"], "distilled-64": runs["distilled-64"]}
    )
    assert found == pytest.approx({"twin-96": 1.0, "distilled-64": 1.25})
