"""RelationalKD (Park et al. 2019): distance- and angle-wise relations of the query embeddings."""

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

from lightning_metakd.algorithms import MAML, MatchingNet, ProtoNet
from lightning_metakd.distill import (
    RelationalKD,
    TaskLoss,
    angle_potentials,
    distance_potentials,
    relational_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)
from lightning_metakd.models import Conv4

pytestmark = pytest.mark.usefixtures("one_thread")

TRIANGLE = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # sides 3, 4, 5


@pytest.fixture(scope="module")
def episode():
    return tiny_episode()


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) <= 1 else abs(x) - 0.5


def test_distance_potentials_by_hand():
    psi = distance_potentials(TRIANGLE)  # mean distance (3 + 4 + 5) / 3 = 4
    expected = torch.tensor([[0, 3, 4], [3, 0, 5], [4, 5, 0]]) / 4.0
    torch.testing.assert_close(psi, expected)


def test_distance_loss_by_hand():
    student = torch.tensor([[0.0], [1.0], [2.0]])  # distances 1, 2, 1: mean 4/3
    s = [0.75, 1.5, 0.75]  # pairs (0,1), (0,2), (1,2)
    t = [0.75, 1.0, 1.25]
    expected = sum(huber(a - b) for a, b in zip(s, t, strict=True)) / 3
    assert math.isclose(float(rkd_distance_loss(student, TRIANGLE)), expected, rel_tol=1e-6)
    # the Huber loss turns linear beyond 1: a far outlier costs |x| - 1/2
    # the Huber loss turns linear beyond 1: four points together and one far away, against a
    # regular simplex (every potential 1); the 4 far pairs have potential 10 / 4 = 2.5, the 6 near
    # ones 0: 2 * (4 * (1.5 - 1/2) + 6 * (1/2)) / 20
    far = torch.tensor([[0.0], [0.0], [0.0], [0.0], [100.0]])
    expected = 2 * (4 * (1.5 - 0.5) + 6 * 0.5) / 20
    assert math.isclose(float(rkd_distance_loss(far, torch.eye(5))), expected, rel_tol=1e-6)


def test_angle_potentials_and_loss_by_hand():
    psi = angle_potentials(TRIANGLE)
    assert math.isclose(float(psi[0, 1, 2]), 0.0, abs_tol=1e-7)  # the right angle at point 0
    assert math.isclose(float(psi[1, 0, 2]), 3 / 5, rel_tol=1e-6)  # cos at (3, 0): 3/5
    assert math.isclose(float(psi[2, 0, 1]), 4 / 5, rel_tol=1e-6)
    assert float(psi[1, 1, 2]) == 0.0  # a degenerate "angle" i = j
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])  # cos 1, -1, 1 at vertices 0, 1, 2
    # against the triangle's cos 0, 3/5, 4/5; each vertex in 2 ordered triples of the 6
    expected = 2 * (huber(1 - 0) + huber(-1 - 3 / 5) + huber(1 - 4 / 5)) / 6
    assert math.isclose(float(rkd_angle_loss(line, TRIANGLE)), expected, rel_tol=1e-6)


def test_relations_ignore_width_scale_rotation_and_translation():
    torch.manual_seed(0)
    teacher_embedding = torch.randn(7, 16, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0]
    moved = 0.3 * teacher_embedding @ rotation + 2.0
    padded = torch.cat([moved, torch.zeros(7, 48, dtype=torch.float64)], 1)  # another width
    assert float(relational_loss(padded, teacher_embedding)) < 1e-20
    other = torch.randn(7, 3, dtype=torch.float64)
    d, a = rkd_distance_loss(other, teacher_embedding), rkd_angle_loss(other, teacher_embedding)
    assert d > 0 and a > 0
    torch.testing.assert_close(relational_loss(other, teacher_embedding, 0.5, 3.0), 0.5 * d + 3 * a)


def test_the_term_is_relational_loss_of_the_query_embeddings(episode):
    term = RelationalKD(weight=0.5, distance_weight=1.0, angle_weight=2.0)
    model = make_distiller(teacher(ProtoNet(), hidden=16), terms=[TaskLoss(), term])
    assert term.student_paths() == ["features.3"] and term.teacher_paths(0) == ["features.3"]
    out = model.episode_loss(episode)
    expected = []
    with torch.no_grad():
        for qx in episode.query_x:  # ProtoNet: the query embeddings are the model's outputs
            s, t = model.student.model(qx), model.teachers[0].model(qx)
            expected.append(relational_loss(s, t, 1.0, 2.0))
    torch.testing.assert_close(out.terms["relational"], 0.5 * torch.stack(expected).mean())


def test_a_student_that_is_the_teacher_has_zero_loss(episode):
    protonet = teacher(ProtoNet())
    model = make_distiller(protonet, Conv4(hidden=8, image_size=16), init_from_teacher=True,
                           terms=[TaskLoss(), RelationalKD()])  # fmt: skip
    assert model.episode_loss(episode).terms["relational"].item() < 1e-10


def test_maml_student_and_two_teachers_mix_with_the_teacher_weights(episode):
    teachers = [teacher(MAML(inner_lr=0.5)), teacher(MatchingNet(), hidden=16, seed=1)]
    single = [
        make_distiller(t, algorithm=MAML(inner_lr=0.5), terms=[RelationalKD()]).episode_loss(
            episode
        )
        for t in teachers
    ]
    both = make_distiller(teachers, algorithm=MAML(inner_lr=0.5), terms=[RelationalKD()],
                          teacher_weights=[3.0, 1.0]).episode_loss(episode)  # fmt: skip
    mixed = 0.75 * single[0].terms["relational"] + 0.25 * single[1].terms["relational"]
    torch.testing.assert_close(both.terms["relational"], mixed)


def test_gradients_reach_the_student_never_the_teacher(episode):
    model = make_distiller(teacher(MAML(inner_lr=0.5)), algorithm=MAML(inner_lr=0.5),
                           terms=[RelationalKD()])  # fmt: skip
    assert_gradients_reach_the_student_only(model, episode)


def test_vmap_path_equals_loop_path(episode):
    # float64: the angles' float32 rounding (about 1e-5 of the largest gradient) is above the
    # float32 tolerances; in double precision both paths agree to 1e-10
    assert_loop_equals_vmap(
        lambda: make_distiller(teacher(MAML(inner_lr=0.5)), algorithm=MAML(inner_lr=0.5),
                               terms=[TaskLoss(), RelationalKD(angle_weight=1.0)]),
        episode, float64=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: rkd_distance_loss(torch.randn(4, 3), torch.randn(5, 3)), "4 samples but"),
        (lambda: rkd_angle_loss(torch.randn(2, 3), torch.randn(2, 3)), "at least 3"),
        (lambda: rkd_distance_loss(torch.randn(1, 3), torch.randn(1, 3)), "at least 2"),
        (lambda: distance_potentials(torch.randn(5)), r"embeddings \[N, \.\.\.\]"),
        (lambda: relational_loss(torch.randn(3, 2), torch.randn(3, 2), 0, 0), "both 0"),
        (lambda: RelationalKD(distance_weight=0, angle_weight=0), "matches nothing"),
        (lambda: RelationalKD(angle_weight=-1), "angle_weight must be a non-negative"),
        (lambda: RelationalKD(student_tap=""), "student_tap must be a module path"),
        (lambda: RelationalKD(teacher_tap=[]), "teacher_tap must be a module path"),
    ],
)
def test_bad_inputs_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_taps_fail_at_bind():
    protonet = teacher(ProtoNet())
    with pytest.raises(ValueError, match="has no submodule 'features.9'"):
        make_distiller(protonet, terms=[RelationalKD(student_tap="features.9")])
    with pytest.raises(ValueError, match="2 teacher_tap paths for 1 teachers"):
        make_distiller(protonet, terms=[RelationalKD(teacher_tap=["features.3", "features.2"])])
