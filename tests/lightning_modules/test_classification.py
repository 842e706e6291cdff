from dataclasses import replace

import pytest
import torch

from datamodules.base import TaskStream
from lightning_modules import ER, Finetune

STREAM = TaskStream(task_names=("a", "b", "c"), classes_per_task=(2, 2, 2), input_shape=(1, 2, 2))


def _module_with_head(logits_bias: list[float]) -> Finetune:
    """A module whose logits are a fixed bias (zero weights), so predictions are known by hand."""
    m = Finetune(stream=STREAM, backbone_args={"hidden": [3]})
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.tensor(logits_bias))
    return m


def test_class_il_masks_unseen_classes_and_task_il_masks_other_tasks():
    # Highest logit overall is class 5 (task 2), then class 3 (task 1), then class 0 (task 0).
    m = _module_with_head([3.0, 1.0, 0.0, 4.0, 0.0, 9.0])
    x = torch.zeros(2, 1, 2, 2)
    batch = {"x": x, "y": torch.tensor([3, 0]), "task": torch.tensor([1, 0])}
    m.current_task = 1  # classes 0..3 seen
    out = m.eval_step(batch, task_id=1)
    assert out["accuracy"].tolist() == [1.0, 0.0]  # class-IL predicts 3 (5 is masked)
    assert out["task_il_accuracy"].tolist() == [1.0, 0.0]  # task 1's range {2, 3} -> 3
    out0 = m.eval_step(batch, task_id=0)
    assert out0["task_il_accuracy"].tolist() == [0.0, 1.0]  # task 0's range {0, 1} -> 0
    m.current_task = 2
    assert m.eval_step(batch, task_id=1)["accuracy"].tolist() == [0.0, 0.0]  # now 5 wins everywhere


def test_er_replays_memory_with_the_current_batch_and_stores_raw_inputs():
    torch.manual_seed(0)
    m = ER(stream=STREAM, buffer_size=4, minibatch_size=3, backbone_args={"hidden": [3]})
    batch = {"x": torch.randn(2, 1, 2, 2), "y": torch.tensor([0, 1]), "task": torch.tensor([0, 0])}
    seen_sizes = []
    m.forward = lambda x, f=m.forward: (seen_sizes.append(len(x)), f(x))[1]  # record batch sizes
    m.log = lambda *a, **k: None
    m.training_step(batch, 0)
    assert seen_sizes == [2] and len(m.buffer) == 2  # empty memory: current batch only
    assert torch.equal(m.buffer.data["x"][:2], batch["x"])
    m.training_step(batch, 1)
    assert seen_sizes == [2, 4]  # 2 current + min(3, 2 stored)
    m.training_step(batch, 2)
    assert seen_sizes[-1] == 5 and len(m.buffer) == 4


def test_missing_stream_is_a_clear_error():
    from cli.errors import ConfigError

    with pytest.raises(ConfigError, match="model.stream is missing"):
        Finetune()


DOMAIN = TaskStream(task_names=("r0", "r1", "r2"), classes_per_task=(4, 4, 4), input_shape=(1, 2, 2), setting="domain")


def test_a_domain_il_head_has_the_classes_once_and_every_task_owns_all_of_them():
    m = Finetune(stream=DOMAIN, backbone_args={"hidden": [3]})
    assert m.head.out_features == 4 and m.domain_incremental
    assert [m.task_classes(t) for t in range(3)] == [(0, 4)] * 3
    m.current_task = 0
    assert (m.seen_classes, m.past_classes) == (4, 0)
    m.current_task = 2
    assert (m.seen_classes, m.past_classes) == (4, 4)
    # A class-IL stream keeps its running ranges.
    c = Finetune(stream=STREAM, backbone_args={"hidden": [3]})
    assert c.head.out_features == 6 and [c.task_classes(t) for t in range(3)] == [(0, 2), (2, 4), (4, 6)]


def test_domain_il_eval_step_scores_over_all_classes_and_reports_accuracy_only():
    m = Finetune(stream=DOMAIN, backbone_args={"hidden": [3]})
    with torch.no_grad():
        m.head.weight.zero_()
        m.head.bias.copy_(torch.tensor([0.0, 1.0, 5.0, 2.0]))  # class 2 wins everywhere
    batch = {"x": torch.zeros(3, 1, 2, 2), "y": torch.tensor([2, 3, 2]), "task": torch.tensor([0, 0, 0])}
    for task in (0, 2):  # already in task 0 every class counts; the task id changes nothing
        out = m.eval_step(batch, task_id=task)
        assert list(out) == ["accuracy"] and out["accuracy"].tolist() == [1.0, 0.0, 1.0]


def test_lwf_distils_all_classes_from_the_second_domain_on():
    from lightning_modules import LwF
    from lightning_modules.classification.lwf import soft_cross_entropy

    torch.manual_seed(0)
    m = LwF(stream=DOMAIN, alpha=0.5, backbone_args={"hidden": [3]})
    logged = {}
    m.log = lambda name, value, **k: logged.__setitem__(name, value)
    batch = {"x": torch.randn(5, 1, 2, 2), "y": torch.tensor([0, 1, 2, 3, 1]), "task": torch.zeros(5, dtype=torch.long)}
    m.current_task = 0
    m.training_step(batch, 0)
    assert "train/distill" not in logged  # nothing to distil in the first domain
    m.on_task_start(1)
    with torch.no_grad():
        m.head.bias.add_(torch.tensor([1.0, -1.0, 0.5, 0.0]))  # the live network drifts from the snapshot
    assert m.distillation_target(batch["x"]).shape == (5, 4)
    loss = m.training_step(batch, 1)
    logits = m(batch["x"])
    expected = torch.nn.functional.cross_entropy(logits, batch["y"]) + 0.5 * soft_cross_entropy(
        logits, m.old(batch["x"]), 2.0
    )
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("method", ["Finetune", "Joint", "ER", "DER", "DERpp", "EWC", "LwF", "LMSRR"])
def test_every_domain_il_method_trains_the_one_head_on_all_labels(method):
    import lightning_modules

    torch.manual_seed(0)
    if method == "LMSRR":  # two tiny random ViTs on 32 x 32 images
        shape, m = (3, 32, 32), lightning_modules.LMSRR(stream=replace(DOMAIN, input_shape=(3, 32, 32)))
    else:
        shape, m = (1, 2, 2), getattr(lightning_modules, method)(stream=DOMAIN, backbone_args={"hidden": [3]})
    m.log = lambda *a, **k: None
    batch = {"x": torch.randn(4, *shape), "y": torch.tensor([0, 1, 2, 3]), "task": torch.full((4,), 1)}
    batch["x_raw"] = batch["x"]
    m.current_task = 1
    for step in range(2):  # the second step replays what the first stored
        m.zero_grad()
        m.training_step(batch, step).backward()
    assert m.head.weight.grad.abs().sum(dim=1).gt(0).all()  # a gradient reaches every class's row


def test_icarl_refuses_a_domain_incremental_stream():
    from cli.errors import ConfigError
    from lightning_modules import ICaRL

    with pytest.raises(ConfigError, match=r"model: ICaRL is class-incremental only .* use ER, DER"):
        ICaRL(stream=DOMAIN, backbone_args={"hidden": [3]})


def test_lwf_warm_up_refuses_a_domain_incremental_stream():
    from cli.errors import ConfigError
    from lightning_modules import LwF

    with pytest.raises(ConfigError, match="model.warmup_epochs: a domain-incremental stream has no new classes"):
        LwF(stream=DOMAIN, warmup_epochs=1, backbone_args={"hidden": [3]})


def test_a_stream_setting_is_checked():
    with pytest.raises(ValueError, match="'task'"):
        TaskStream(task_names=("a",), classes_per_task=(2,), setting="task")
    with pytest.raises(ValueError, match="same classes in every task"):
        TaskStream(task_names=("a", "b"), classes_per_task=(2, 3), setting="domain")
