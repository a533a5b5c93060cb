"""AdaptedHead: a MAML-family student's adapted head against the teacher's, on the features θ*
slicing says correspond."""

from __future__ import annotations

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
from lightning_metakd.distill import AdaptedHead, TaskLoss, adapted_head_loss, kept_columns
from lightning_metakd.models import Conv4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def episode():
    return tiny_episode()


def test_the_loss_by_hand():
    w_s, b_s = torch.tensor([[1.0, 2.0], [0.0, 1.0]]), torch.tensor([0.5, 0.0])
    w_t, b_t = torch.tensor([[9.0, 1.0, 2.0], [9.0, 0.0, 3.0]]), torch.tensor([0.0, 1.0])
    # columns 1 and 2 of the teacher: weights differ by 2 in one entry, biases by 0.5 and 1
    value = adapted_head_loss(w_s, b_s, w_t, b_t, torch.tensor([1, 2]))
    assert float(value) == 4.0 + 0.25 + 1.0
    assert float(adapted_head_loss(w_t, b_t, w_t, b_t)) == 0.0


def test_kept_columns_are_the_channels_theta_star_slicing_kept(episode):
    maml = teacher(MAML(inner_lr=0.5))
    model = make_distiller(maml, algorithm=MAML(inner_lr=0.5), init_from_teacher=True,
                           terms=[AdaptedHead()])  # fmt: skip
    (term,) = model.terms
    # Conv4 at 16 px embeds 1x1 maps: head column c is channel c of the last block, and the
    # default rule (bn_gamma) keeps the 4 channels of largest |γ| of its BatchNorm, in order
    gamma = maml.learner.model.backbone.features[3][1].weight.detach().abs()
    top = sorted(gamma.argsort(descending=True)[:4].tolist())
    assert term._columns == [top]
    head = model.student.model.head.weight.detach()
    torch.testing.assert_close(head, maml.learner.model.head.weight.detach()[:, top])
    assert kept_columns(torch.zeros_like(head), maml.learner.model.head.weight.detach()) is None


def test_the_term_compares_the_adapted_heads_of_every_task(episode):
    maml = teacher(MAML(inner_lr=0.4, inner_steps=1, inner_steps_test=2))
    model = make_distiller(maml, algorithm=ANIL(inner_lr=0.5, inner_steps=2), init_from_teacher=True,
                           terms=[TaskLoss(), AdaptedHead(weight=0.1)])  # fmt: skip
    columns = torch.tensor(model.terms[1]._columns[0])
    out = model.episode_loss(episode)
    student, t_learner = model.student, model.teachers[0]
    expected = []
    with torch.no_grad():
        for sx, sy in zip(episode.support_x, episode.support_y, strict=True):
            s = student.algorithm.adapt(student.model, student.params(), sx, sy, 3, True)
            t = t_learner.algorithm.adapt(t_learner.model, t_learner.params(), sx, sy, 3, False)
            w = t["head.weight"][:, columns]
            expected.append(((s["head.weight"] - w) ** 2).sum()
                            + ((s["head.bias"] - t["head.bias"]) ** 2).sum())  # fmt: skip
    torch.testing.assert_close(out.terms["adapted_head"], 0.1 * torch.stack(expected).mean())


def test_a_student_that_is_the_teacher_has_zero_loss(episode):
    maml = teacher(MAML(inner_lr=0.5, inner_steps=2))
    model = make_distiller(maml, Conv4(hidden=8, image_size=16), MAML(inner_lr=0.5, inner_steps=2),
                           init_from_teacher=True, terms=[AdaptedHead()])  # fmt: skip
    assert model.terms[0]._columns == [None]
    assert model.episode_loss(episode).loss.item() < 1e-12


def test_gradients_reach_the_student_never_the_teacher(episode):
    model = make_distiller(teacher(MAML(inner_lr=0.5)), algorithm=ANIL(inner_lr=0.5),
                           init_from_teacher=True, terms=[AdaptedHead()])  # fmt: skip
    assert_gradients_reach_the_student_only(model, episode)


def test_vmap_path_equals_loop_path(episode):
    assert_loop_equals_vmap(
        lambda: make_distiller(teacher(MetaSGD(inner_lr=0.3)), algorithm=MAML(inner_lr=0.5, inner_steps=2),
                               init_from_teacher=True, terms=[TaskLoss(), AdaptedHead()]),
        episode,
    )  # fmt: skip


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: adapted_head_loss(torch.zeros(3, 4), torch.zeros(3), torch.zeros(3, 8), torch.zeros(3)),
         "adapted heads differ in shape"),
        (lambda: make_distiller(teacher(MAML()), terms=[AdaptedHead()]),
         "needs a MAML-family student and teachers.*the student is a ProtoNet"),
        (lambda: make_distiller(teacher(ProtoNet()), algorithm=MAML(), terms=[AdaptedHead()]),
         "the teacher is a ProtoNet"),
        (lambda: make_distiller(teacher(MAML()), algorithm=MAML(), terms=[AdaptedHead()]),
         r"its head is \(3, 8\) and the student's \(3, 4\).*init_from_teacher: true"),
        (lambda: make_distiller([teacher(MAML()), teacher(MAML(), seed=1)], algorithm=MAML(),
                                init_from_teacher=True, terms=[AdaptedHead()]),
         "the teacher 1, but its head"),
    ],
)  # fmt: skip
def test_bad_inputs_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()
