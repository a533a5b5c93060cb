"""PrototypeMatching: a metric student's prototypes (or support embeddings) arranged as the
teacher's, compared width-free through their normalised distances."""

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
from lightning_metakd.algorithms.protonet import class_means
from lightning_metakd.distill import (
    PrototypeMatching,
    TaskLoss,
    prototype_matching_loss,
    rkd_distance_loss,
)
from lightning_metakd.models import Conv4
from lightning_metakd.modules import DistillationModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def episode():
    return tiny_episode(ways=4, shots=2, queries=2)


def make_ways(teachers, algorithm, terms, hidden: int = 4, **kwargs) -> DistillationModule:
    """A 4-way student (Conv4-``hidden``, 16 px) of ``teachers``, seeded."""
    torch.manual_seed(1)
    return DistillationModule(teachers, Conv4(hidden=hidden, image_size=16), algorithm, ways=4,
                              terms=terms, **kwargs)  # fmt: skip


def test_the_loss_by_hand():
    teacher_points = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # potentials 3/4, 1, 5/4
    equilateral = torch.eye(3) * 7  # potentials all 1, in another width and scale
    # Huber on the 6 ordered pairs: ½(1/4)² for the sides 3 and 5 (potentials 3/4, 5/4), 0 for 4
    expected = 4 * 0.5 * 0.25**2 / 6
    assert math.isclose(
        float(prototype_matching_loss(equilateral, teacher_points)), expected, rel_tol=1e-6
    )
    similar = 2 * teacher_points @ torch.tensor([[0.6, -0.8], [0.8, 0.6]]) + 1  # rotated, scaled
    assert float(prototype_matching_loss(similar, teacher_points)) < 1e-12


def test_protonet_term_matches_the_prototypes_of_every_task(episode):
    term = PrototypeMatching(weight=2.0)
    model = make_ways(teacher(ProtoNet(), hidden=16), ProtoNet(), [TaskLoss(), term])
    out = model.episode_loss(episode)
    expected = []
    with torch.no_grad():
        for sx, sy in zip(episode.support_x, episode.support_y, strict=True):
            s = class_means(model.student.model(sx), sy, 4)
            t = class_means(model.teachers[0].model(sx), sy, 4)
            expected.append(rkd_distance_loss(s, t))
    torch.testing.assert_close(out.terms["prototype_matching"], 2.0 * torch.stack(expected).mean())


def test_matchingnets_match_their_support_embeddings_and_mixed_pairs_their_class_means(episode):
    term = PrototypeMatching(angle_weight=1.0)
    teachers = [teacher(MatchingNet(), ways=4), teacher(ProtoNet(distance="cosine"), ways=4)]
    model = make_ways(teachers, MatchingNet(), [term])
    assert term._support_level == [True, False]
    out = model.episode_loss(episode)
    expected = []
    with torch.no_grad():
        for sx, sy in zip(episode.support_x, episode.support_y, strict=True):
            s = torch.nn.functional.normalize(model.student.model(sx), dim=-1)  # [N*K, D]
            t0 = torch.nn.functional.normalize(model.teachers[0].model(sx), dim=-1)
            t1 = torch.nn.functional.normalize(
                class_means(model.teachers[1].model(sx), sy, 4), dim=-1
            )
            expected.append(0.5 * prototype_matching_loss(s, t0, 1.0, 1.0)
                            + 0.5 * prototype_matching_loss(class_means(s, sy, 4), t1, 1.0, 1.0))  # fmt: skip
    torch.testing.assert_close(out.terms["prototype_matching"], torch.stack(expected).mean())


def test_a_student_that_is_the_teacher_has_zero_loss(episode):
    model = make_ways(teacher(ProtoNet(), ways=4), ProtoNet(), [TaskLoss(), PrototypeMatching()],
                      hidden=8, init_from_teacher=True)  # fmt: skip
    assert model.episode_loss(episode).terms["prototype_matching"].item() < 1e-10


def test_gradients_reach_the_student_never_the_teacher(episode):
    model = make_ways(teacher(ProtoNet(), hidden=16, ways=4), ProtoNet(), [PrototypeMatching()])
    assert_gradients_reach_the_student_only(model, episode)


@pytest.mark.parametrize("algorithm", [ProtoNet, MatchingNet])
def test_vmap_path_equals_loop_path(episode, algorithm):
    assert_loop_equals_vmap(
        lambda: make_ways(teacher(algorithm(), hidden=16, ways=4), algorithm(),
                          [TaskLoss(), PrototypeMatching(angle_weight=1.0)]),
        episode, float64=True,
    )  # fmt: skip


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: prototype_matching_loss(torch.randn(2, 4), torch.randn(2, 8)), "at least 3"),
        (lambda: prototype_matching_loss(torch.randn(3, 4), torch.randn(4, 8)), "3 samples but"),
        (
            lambda: prototype_matching_loss(torch.randn(3), torch.randn(3, 8)),
            r"class points \[P, D\]",
        ),
        (lambda: PrototypeMatching(distance_weight=0), "matches nothing"),
        (lambda: PrototypeMatching(distance_weight=-1), "non-negative"),
    ],
)
def test_bad_inputs_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_students_and_teachers_without_prototypes_fail_at_bind():
    with pytest.raises(ValueError, match="needs a ProtoNet or MatchingNet student and teachers.*"
                                         "the student is a MAML"):  # fmt: skip
        make_distiller(teacher(ProtoNet()), algorithm=MAML(), terms=[PrototypeMatching()])
    with pytest.raises(ValueError, match="but the teacher is a MAML"):
        make_distiller(teacher(MAML()), terms=[PrototypeMatching()])
    with pytest.raises(ValueError, match="at least 3 classes.*ways=2"):
        DistillationModule(teacher(ProtoNet(), ways=2), Conv4(hidden=4, image_size=16),
                           ProtoNet(), ways=2, terms=[PrototypeMatching()])  # fmt: skip
