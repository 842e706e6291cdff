"""Method-level checks of the classification baselines against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from datamodules.base import TaskStream
from lightning_modules import DER, DERpp, LwF
from lightning_modules.classification.ewc import ewc_penalty, fisher_diagonal
from lightning_modules.classification.icarl import ICaRL, herding

STREAM = TaskStream(task_names=("a", "b"), classes_per_task=(2, 2), input_shape=(1, 2, 2))


def _quiet(m):
    m.log = lambda *a, **k: None
    return m


def test_ewc_fisher_matches_hand_computation_on_a_two_parameter_model():
    model = nn.Linear(1, 2, bias=False)  # logits = [a x, b x]
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5], [-1.0]]))
    xs, ys = [2.0, -1.0, 0.5], [0, 1, 1]
    loader = [
        {"x": torch.tensor([[x] for x in xs[:2]]), "y": torch.tensor(ys[:2])},
        {"x": torch.tensor([[xs[2]]]), "y": torch.tensor(ys[2:])},
    ]
    expected = torch.zeros(2)
    for x, y in zip(xs, ys, strict=True):
        za, zb = 0.5 * x, -1.0 * x
        p = [math.exp(za) / (math.exp(za) + math.exp(zb)), math.exp(zb) / (math.exp(za) + math.exp(zb))]
        g = [(p[k] - (k == y)) * x for k in range(2)]  # d(-log p_y)/d w_k
        expected += p[y] * torch.tensor(g) ** 2
    expected /= len(xs)
    assert torch.allclose(fisher_diagonal(model, loader), expected, atol=1e-6)
    # penalty: sum F_i (theta_i - anchor_i)^2
    theta, anchor = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 4.0])
    assert float(ewc_penalty(expected, theta, anchor)) == pytest.approx(float(expected[0] * 1 + expected[1] * 4))


def test_der_loss_is_ce_plus_alpha_logit_mse():
    torch.manual_seed(0)
    m = _quiet(DER(stream=STREAM, alpha=0.7, buffer_size=2, minibatch_size=2, backbone_args={"hidden": [3]}))
    mx, my, mz = torch.randn(2, 1, 2, 2), torch.tensor([0, 1]), torch.randn(2, 4)
    m.buffer.add(x=mx, y=my, logits=mz, task=torch.zeros(2, dtype=torch.long))
    batch = {"x": torch.randn(3, 1, 2, 2), "y": torch.tensor([2, 3, 2]), "task": torch.ones(3, dtype=torch.long)}
    expected = F.cross_entropy(m(batch["x"]), batch["y"]) + 0.7 * F.mse_loss(m(mx), mz)
    assert float(m.training_step(batch, 0)) == pytest.approx(float(expected), rel=1e-6)
    # The memory now holds the batch's own logits as seen at this step (capacity 2: some replaced).
    assert m.buffer.num_seen == 5 and m.buffer.data["logits"].shape == (2, 4)


def test_derpp_adds_beta_label_ce_on_a_second_sample():
    torch.manual_seed(0)
    m = _quiet(
        DERpp(stream=STREAM, alpha=0.0, beta=2.0, buffer_size=1, minibatch_size=1, backbone_args={"hidden": [3]})
    )
    mx, my = torch.randn(1, 1, 2, 2), torch.tensor([1])
    m.buffer.add(x=mx, y=my, logits=torch.zeros(1, 4), task=torch.zeros(1, dtype=torch.long))
    batch = {"x": torch.randn(2, 1, 2, 2), "y": torch.tensor([2, 3]), "task": torch.ones(2, dtype=torch.long)}
    expected = F.cross_entropy(m(batch["x"]), batch["y"]) + 2.0 * F.cross_entropy(m(mx), my)
    assert float(m.training_step(batch, 0)) == pytest.approx(float(expected), rel=1e-6)


def test_lwf_distillation_target_is_the_old_models_output():
    torch.manual_seed(0)
    m = _quiet(LwF(stream=STREAM, backbone_args={"hidden": [3]}))
    x = torch.randn(4, 1, 2, 2)
    m.on_task_start(1)  # snapshot of the network as it is now
    before = m(x).detach()
    assert torch.equal(m.distillation_target(x), before[:, :2])
    optimizer = torch.optim.SGD(m.trainable_parameters(), lr=0.5)
    loss = m.training_step({"x": x, "y": torch.tensor([2, 3, 2, 3]), "task": torch.ones(4, dtype=torch.long)}, 0)
    loss.backward()
    optimizer.step()
    assert not torch.allclose(m(x), before)  # the live network moved ...
    assert torch.equal(m.distillation_target(x), before[:, :2])  # ... the target did not
    assert all(not p.requires_grad for p in m.old.parameters())
    assert all(id(p) not in {id(q) for q in m.old.parameters()} for p in m.trainable_parameters())


def test_herding_picks_greedily_the_running_mean_closest_to_the_class_mean():
    # Mean of the four points is (1, 0). The first pick is the point nearest the mean: (1, 0.1).
    # Then the point whose average with it is nearest (1, 0): (1, -0.1), and so on.
    pts = torch.tensor([[3.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [1.0, -0.1]])
    assert herding(pts, 2).tolist() == [1, 3]
    order = herding(pts, 4).tolist()
    assert order[:2] == [1, 3] and sorted(order) == [0, 1, 2, 3]
    # With 3 picks: after (1, .1) and (1, -.1) the mean is (1, 0); adding (3,0) gives (5/3, 0),
    # adding (-1, 0) gives (1/3, 0): both 2/3 away, the first index wins the tie.
    assert herding(pts, 3).tolist() == [1, 3, 0]


def test_icarl_predicts_the_nearest_class_mean():
    m = ICaRL(stream=STREAM, memory_size=4, backbone_args={"hidden": [3]})
    with torch.no_grad():
        m.class_means.zero_()
        m.class_means[:, 0] = 1.0  # all classes alike but ...
        m.class_means[1] = F.normalize(torch.tensor([0.0, 1.0, 0.0]), dim=0)
        m.memory_y[0] = 1  # a memory exists, so NCM is used
    m.features = lambda x: F.normalize(torch.tensor([[0.1, 1.0, 0.0], [1.0, 0.0, 0.1]]), dim=1)
    out = m.eval_step({"x": torch.zeros(2, 1, 2, 2), "y": torch.tensor([1, 0])}, task_id=0)
    assert out["accuracy"].tolist() == [1.0, 1.0]
