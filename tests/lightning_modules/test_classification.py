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
