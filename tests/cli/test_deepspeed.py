"""DeepSpeed keeps the first task's optimizer for the whole stream: a method that trains other parameters later
is refused before anything runs, and a run whose trainable parameters change anyway stops at that task. The
ZeRO-2 runs themselves need CUDA and the deepspeed package; elsewhere they skip with the reason."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from torch import nn

from callbacks import TaskSwitch
from cli.errors import ConfigError
from lightning_modules.base import ContinualModule
from tests.conftest import config, fit_args, read_reports


class TwoLayers(ContinualModule):
    """Trains layer `a` in task 0 and layer `b` from task 1 on (or `a` throughout with `same=True`)."""

    def __init__(self, same: bool):
        super().__init__(stream=SimpleNamespace(num_tasks=2))
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)
        self.same = same

    def trainable_parameters(self) -> list[nn.Parameter]:
        layer = self.a if self.same or self.current_task == 0 else self.b
        return list(layer.parameters())


def start_tasks(switch: TaskSwitch, module: TwoLayers, strategy) -> None:
    trainer = SimpleNamespace(strategy=strategy)
    for t in range(2):
        switch.task = t
        module.on_task_start(t)
        switch._note_trainable(trainer, module, module.trained_names())


def test_trained_names_follow_the_optimizer_groups():
    module = TwoLayers(same=False)
    assert module.trained_names() == {"a.weight", "a.bias"}
    module.on_task_start(1)
    assert module.trained_names() == {"b.weight", "b.bias"}
    optimizer = torch.optim.SGD([{"params": list(module.a.parameters())}, {"params": [module.b.bias]}], lr=0.1)
    assert module.trained_names(optimizer.param_groups) == {"a.weight", "a.bias", "b.bias"}


def test_task_switch_records_a_change_of_trained_parameters_and_deepspeed_stops_there():
    switch = TaskSwitch()
    start_tasks(switch, TwoLayers(same=False), DDPStrategy())
    assert switch.trainable_changes == [1]  # recorded, and DDP rebuilds its optimizer, so it goes on
    switch = TaskSwitch()
    start_tasks(switch, TwoLayers(same=True), object.__new__(DeepSpeedStrategy))
    assert switch.trainable_changes == []
    deepspeed = object.__new__(DeepSpeedStrategy)  # an instance without its __init__, which needs the package
    with pytest.raises(ConfigError) as err:
        start_tasks(TaskSwitch(), TwoLayers(same=False), deepspeed)
    line = str(err.value)
    assert "trainer.strategy deepspeed" in line and "TwoLayers" in line and "task 1" in line and "ddp" in line


class Masked(TwoLayers):
    """Changes no parameter between tasks but says DeepSpeed breaks it (as PackNet's gradient masks do)."""

    def deepspeed_unsupported(self) -> str | None:
        return "Masked zeroes gradients by task"


def test_task_switch_refuses_deepspeed_however_it_was_given():
    """A DeepSpeedStrategy built outside the CLI (a class_path, a Trainer in Python) is refused at setup with
    the module's reason, also for a method the parameter record cannot catch; other modules pass this check."""
    deepspeed = object.__new__(DeepSpeedStrategy)
    trainer = SimpleNamespace(strategy=deepspeed, datamodule=None)
    with pytest.raises(ConfigError) as err:
        TaskSwitch().setup(trainer, Masked(same=True), "fit")
    line = str(err.value)
    assert line.startswith("trainer.strategy deepspeed: Masked zeroes gradients by task") and "ddp" in line
    with pytest.raises(ConfigError, match="ContinualDataModule"):  # past the DeepSpeed check, at the data's
        TaskSwitch().setup(trainer, TwoLayers(same=True), "fit")
    with pytest.raises(ConfigError, match="ContinualDataModule"):
        TaskSwitch().setup(SimpleNamespace(strategy=DDPStrategy(), datamodule=None), Masked(same=True), "fit")


@pytest.mark.parametrize(
    ("experiment", "names"),
    [
        ("diffusion/r2moe_concepts_tiny.yaml", "R2MoE trains a new expert"),
        ("diffusion/rid_rewards_tiny.yaml", "RID trains a new LoRA adapter"),
        ("diffusion/sequential_lora_concepts_tiny.yaml", "token row"),
    ],
)
def test_deepspeed_refuses_a_method_that_trains_other_parameters_later(tmp_path, experiment, names):
    from cli.main import LifelongCLI

    with pytest.raises(ConfigError) as err:
        LifelongCLI(args=fit_args(experiment, tmp_path, "-c", config("trainer/deepspeed_zero2.yaml")))
    line = str(err.value)
    assert line.startswith("trainer.strategy deepspeed_stage_2:") and names in line and "ddp" in line
    assert not (tmp_path / "lightning_logs").exists() or not any((tmp_path / "lightning_logs").rglob("*.ckpt"))


NO_DEEPSPEED = not torch.cuda.is_available() or importlib.util.find_spec("deepspeed") is None
WHY = "DeepSpeed ZeRO-2 needs a CUDA GPU and `pip install -e .[deepspeed]`"


@pytest.mark.skipif(NO_DEEPSPEED, reason=WHY)
@pytest.mark.parametrize(
    "experiment",
    [
        "classification/er_splitdigits.yaml",
        "classification/lmsrr_splitdigits.yaml",
        "diffusion/sequential_reward_rewards_tiny.yaml",
        "removal/rorem_tiny.yaml",
    ],
)
def test_zero2_runs_two_tasks_and_writes_finite_metrics(run_fit, tmp_path, experiment):
    extra = ("-c", config("trainer/deepspeed_zero2.yaml"), "--trainer.devices=1", "--task_switch.steps_per_task=3")
    if experiment.startswith("classification"):
        extra += ("--data.init_args.num_tasks=2",)
    run_fit(experiment, tmp_path, *extra)
    report = read_reports(tmp_path)[-1]
    assert all(v is not None and v == v for row in report["matrix"] for v in row[: len(report["matrix"])])
