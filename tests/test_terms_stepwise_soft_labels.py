"""StepwiseSoftLabels: soft labels after every inner step of a MAML-family student."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_distiller
from term_checks import (
    assert_gradients_reach_the_student_only,
    assert_loop_equals_vmap,
    teacher,
    tiny_episode,
)

from lightning_metakd.algorithms import ANIL, MAML, MetaSGD, ProtoNet
from lightning_metakd.algorithms.normalization import TRANSDUCTIVE
from lightning_metakd.distill import (
    SoftLabels,
    StepwiseSoftLabels,
    TaskLoss,
    soft_label_loss,
    step_logits,
    stepwise_soft_label_loss,
)
from lightning_metakd.models import Conv4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def episode():
    return tiny_episode()


def test_the_loss_by_hand():
    student = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])]  # p = ½, ¾
    target = [torch.tensor([[math.log(3.0), 0.0]])] * 2  # p = (¾, ¼) at both steps
    kl_first = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    value = stepwise_soft_label_loss(student, [target], [1.0], temperature=1.0)
    assert math.isclose(float(value), kl_first / 2, rel_tol=1e-6)  # step 2 already matches
    two = stepwise_soft_label_loss(student, [target, student], [0.5, 0.5], temperature=1.0)
    mixed = soft_label_loss(student[0], None, 1.0, teacher_probs=torch.tensor([[0.625, 0.375]]))
    torch.testing.assert_close(two, mixed / 2)


def test_step_logits_are_the_inner_loop_cut_after_each_step(episode):
    torch.manual_seed(0)
    algorithm, model = MetaSGD(inner_lr=0.3, inner_steps=3), teacher(MAML()).learner.model
    algorithm.build(model)
    params = dict(model.named_parameters())
    sx, sy, qx = episode.support_x[0], episode.support_y[0], episode.query_x[0]
    logits = step_logits(algorithm, model, params, sx, sy, qx, 3, 3, True, TRANSDUCTIVE)
    for k in (1, 2, 3):
        cut = MetaSGD(inner_lr=0.3, inner_steps=k)
        cut.inner_lrs = algorithm.inner_lrs
        cut._names = algorithm._names
        torch.testing.assert_close(
            logits[k - 1], cut.task_logits(model, params, sx, sy, qx, 3, True)
        )


def test_one_step_and_final_targets_equal_soft_labels(episode):
    values = {}
    for term in (SoftLabels(temperature=2.0), StepwiseSoftLabels(temperature=2.0, target="final")):
        model = make_distiller(teacher(ProtoNet()), algorithm=MAML(inner_lr=0.5), terms=[term])
        values[type(term).__name__] = model.episode_loss(episode).loss
    torch.testing.assert_close(values["StepwiseSoftLabels"], values["SoftLabels"])


def test_each_student_step_against_the_teacher_after_as_many_steps(episode):
    t_module = teacher(MAML(inner_lr=0.4, inner_steps=1, inner_steps_test=2))
    model = make_distiller(t_module, algorithm=ANIL(inner_lr=0.5, inner_steps=3),
                           terms=[StepwiseSoftLabels(weight=0.5, temperature=3.0)])  # fmt: skip
    out = model.episode_loss(episode)
    student, t_learner = model.student, model.teachers[0]
    params, t_params = student.params(), t_learner.params(detach=True)
    expected = []
    with torch.no_grad():
        for sx, sy, qx in zip(episode.support_x, episode.support_y, episode.query_x, strict=True):
            losses = []
            for k in (1, 2, 3):
                s = ANIL(inner_lr=0.5, inner_steps=k).task_logits(
                    student.model, params, sx, sy, qx, 3, True
                )
                t = MAML(inner_lr=0.4, inner_steps=k).task_logits(
                    t_learner.model, t_params, sx, sy, qx, 3, False
                )
                losses.append(soft_label_loss(s, t, 3.0))
            expected.append(sum(losses) / 3)
    torch.testing.assert_close(
        out.terms["stepwise_soft_labels"], 0.5 * torch.stack(expected).mean()
    )


def test_a_student_that_is_the_teacher_has_zero_loss(episode):
    maml = teacher(MAML(inner_lr=0.5, inner_steps=2))
    model = make_distiller(maml, Conv4(hidden=8, image_size=16), MAML(inner_lr=0.5, inner_steps=2),
                           init_from_teacher=True, terms=[StepwiseSoftLabels()])  # fmt: skip
    assert model.episode_loss(episode).loss.item() < 1e-10


def test_gradients_reach_the_student_never_the_teacher(episode):
    model = make_distiller(teacher(MAML(inner_lr=0.5)), algorithm=MAML(inner_lr=0.5, inner_steps=2),
                           terms=[StepwiseSoftLabels()])  # fmt: skip
    assert_gradients_reach_the_student_only(model, episode)


@pytest.mark.parametrize("target", ["steps", "final"])
def test_vmap_path_equals_loop_path(episode, target):
    assert_loop_equals_vmap(
        lambda: make_distiller(teacher(MAML(inner_lr=0.5)), algorithm=MetaSGD(inner_lr=0.3, inner_steps=2),
                               terms=[TaskLoss(), StepwiseSoftLabels(target=target)]),
        episode,
    )  # fmt: skip


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: StepwiseSoftLabels(target="all"), "target must be 'steps'"),
        (lambda: StepwiseSoftLabels(temperature=0), "temperature must be a positive"),
        (lambda: stepwise_soft_label_loss([], [[]], [1.0]), "same number"),
        (lambda: stepwise_soft_label_loss([torch.zeros(1, 2)], [[]], [1.0]), "same number"),
        (lambda: make_distiller(teacher(ProtoNet()), terms=[StepwiseSoftLabels()]),
         "needs a MAML-family student.*ProtoNet"),
        (lambda: make_distiller(teacher(ProtoNet()), algorithm=MAML(), terms=[StepwiseSoftLabels()]),
         r"target='steps'\) needs MAML-family teachers.*use target='final'"),
        (lambda: make_distiller(teacher(MAML()), algorithm=MAML(inner_steps=0),
                                terms=[StepwiseSoftLabels()]), "inner_steps=0"),
    ],
)  # fmt: skip
def test_bad_inputs_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
