"""Mammoth's protocol choices as options: initialisation, LwF's warm-up, Joint at the last task, the online-EWC
Fisher's normalisation, and the class-IL mask of the evaluation ahead of a task (Mammoth's FWT)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cli.errors import ConfigError
from datamodules.base import TaskStream, TensorDictDataset
from lightning_modules import ER, EWC, Joint, LwF
from lightning_modules.nn.backbones import MLP, ResNet18
from lightning_modules.nn.init import expected_std

STREAM = TaskStream(task_names=("a", "b"), classes_per_task=(2, 2), input_shape=(1, 16, 16))


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("scheme", ["xavier_uniform", "kaiming_uniform"])
def test_mlp_and_head_initial_weights_follow_the_scheme(scheme):
    torch.manual_seed(0)
    model = ER(stream=STREAM, backbone_args={"hidden": [512, 384], "init": scheme})
    layers = [*_linears(model.backbone), model.head]  # the head follows the backbone's init
    for layer in layers:
        fan_out, fan_in = layer.weight.shape
        std = expected_std(scheme, fan_in, fan_out)
        bound = math.sqrt(3) * std  # both schemes are uniform on [-bound, bound]
        w = layer.weight.detach()
        assert w.abs().max() <= bound + 1e-7
        if w.numel() > 10_000:  # enough draws for the spread to be within a few percent
            assert w.std().item() == pytest.approx(std, rel=0.03)
        if scheme == "xavier_uniform":  # Mammoth's xavier(): zero bias
            assert torch.equal(layer.bias, torch.zeros_like(layer.bias))
        else:  # PyTorch's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), not zero
            assert layer.bias.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7 and layer.bias.abs().sum() > 0


def test_the_mlp_defaults_to_mammoths_xavier_and_head_init_overrides_it():
    torch.manual_seed(0)
    assert MLP((1, 8, 8)).init == "xavier_uniform"
    model = ER(stream=STREAM, backbone_args={"hidden": [64]}, head_init="kaiming_uniform")
    assert torch.equal(model.backbone.net[1].bias, torch.zeros(64)) and model.head.bias.abs().sum() > 0
    with pytest.raises(ConfigError, match="model.head_init: unknown initialisation 'glorot'"):
        ER(stream=STREAM, head_init="glorot")
    with pytest.raises(ConfigError, match="model.backbone_args.init"):
        ER(stream=STREAM, backbone_args={"init": "normal"})


def test_resnet_kaiming_normal_is_torchvisions():
    torch.manual_seed(0)
    net = ResNet18((3, 32, 32), nf=8, init="kaiming_normal")
    conv = net.stages[-1].conv1  # 32 -> 64 channels, 3x3
    fan_out = conv.out_channels * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    default = ResNet18((3, 32, 32), nf=8)  # PyTorch's kaiming_uniform: bound sqrt(1 / fan_in)
    conv = default.stages[-1].conv1
    assert conv.weight.abs().max() <= 1 / math.sqrt(conv.in_channels * 9) + 1e-7


def _attach_task_data(model, datasets: list, batch_size: int) -> None:
    """Gives a bare module the trainer attributes its boundary passes read (datamodule, batch size)."""
    model._trainer = SimpleNamespace(
        datamodule=SimpleNamespace(train_dataset=datasets.__getitem__, batch_size=batch_size)
    )


def _task_data(seed: int, labels: list[int], n: int = 24) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(labels * (n // len(labels)))
    return TensorDictDataset(x=torch.randn(n, 1, 16, 16, generator=g), y=y, task=torch.zeros(n, dtype=torch.long))


def test_lwf_warm_up_trains_the_new_classes_head_rows_only_and_the_snapshot_follows():
    torch.manual_seed(0)
    data = [_task_data(0, [0, 1]), _task_data(1, [2, 3])]
    runs = []
    for epochs in (0, 3, 3):
        torch.manual_seed(0)
        m = LwF(stream=STREAM, backbone_args={"hidden": [16]}, warmup_epochs=epochs)
        _attach_task_data(m, data, batch_size=8)
        backbone = {k: v.clone() for k, v in m.backbone.state_dict().items()}
        head = m.head.weight.detach().clone(), m.head.bias.detach().clone()
        m.on_task_start(1)
        assert all(torch.equal(v, m.backbone.state_dict()[k]) for k, v in backbone.items())  # frozen
        assert torch.equal(m.head.weight[:2], head[0][:2]) and torch.equal(m.head.bias[:2], head[1][:2])
        assert m.training  # train mode is back
        x = data[1].tensors["x"]
        assert torch.equal(m.old(x), m(x))  # the old network is taken after the warm-up
        runs.append((m.head.weight.detach().clone(), head))
    (unwarmed, start), (warmed, _), (again, _) = runs
    assert torch.equal(unwarmed, start[0])  # warmup_epochs 0: nothing changes (the suite's default)
    assert not torch.equal(warmed[2:], start[0][2:])  # the new classes' rows trained
    assert torch.equal(warmed, again)  # the shuffle and the steps are seeded: the same head again
    with pytest.raises(ConfigError, match="model.warmup_epochs"):
        LwF(stream=STREAM, warmup_epochs=-1)


def test_ewc_fisher_normalised_by_samples_or_by_mammoths_batches_times_batch_size():
    fishers = {}
    for mode in ("samples", "batches"):
        torch.manual_seed(0)
        m = EWC(stream=STREAM, backbone_args={"hidden": [8]}, fisher_normalisation=mode)
        _attach_task_data(m, [_task_data(0, [0, 1], n=10)], batch_size=4)
        m.on_task_end(0)
        fishers[mode] = m.fisher.clone()
    # 10 examples in batches of 4: Mammoth divides the sum by 3 batches x 4 = 12 instead of 10
    assert torch.allclose(fishers["batches"], fishers["samples"] * 10 / 12, rtol=1e-6)
    assert fishers["samples"].sum() > 0
    with pytest.raises(ConfigError, match="model.fisher_normalisation"):
        EWC(stream=STREAM, fisher_normalisation="examples")


def test_joint_last_skips_every_task_but_the_last():
    m = Joint(stream=STREAM, backbone_args={"hidden": [8]}, schedule="last")
    m.log = lambda *a, **k: None
    batch = {"x": torch.randn(4, 1, 16, 16), "y": torch.tensor([0, 1, 2, 3]), "task": torch.zeros(4)}
    assert m.training_step(batch, 0) is None  # Lightning then skips backward and the optimizer step
    m.on_task_start(1)
    assert isinstance(m.training_step(batch, 0), torch.Tensor)
    cumulative = Joint(stream=STREAM, backbone_args={"hidden": [8]})
    cumulative.log = m.log
    assert isinstance(cumulative.training_step(batch, 0), torch.Tensor)
    with pytest.raises(ConfigError, match="model.schedule"):
        Joint(stream=STREAM, schedule="end")


def test_evaluating_ahead_widens_the_class_il_mask_to_the_next_task():
    m = ER(stream=STREAM, backbone_args={"hidden": [8]})
    with torch.no_grad():  # every input scores class 2 (task 1's) highest
        m.head.weight.zero_()
        m.head.bias.copy_(torch.tensor([0.0, 1.0, 5.0, 0.0]))
    batch = {"x": torch.zeros(2, 1, 16, 16), "y": torch.tensor([2, 3])}
    assert m.eval_step(batch, 1)["accuracy"].tolist() == [0.0, 0.0]  # task 1 not started: classes 0, 1 only
    with m.evaluating_ahead(1):
        assert m.seen_classes == 4
        assert m.eval_step(batch, 1)["accuracy"].tolist() == [1.0, 0.0]
    assert m.seen_classes == 2 and m.current_task == 0


def test_mammoth_joint_fits_once_on_the_union_and_reports_both_fwts(run_fit, tmp_path):
    from tests.conftest import read_reports

    run_fit(
        "classification/joint_splitdigits.yaml",
        tmp_path,
        "--model.init_args.schedule=last",
        "--data.init_args.num_tasks=2",
        "--task_switch.epochs_per_task=2",
    )
    (report,) = read_reports(tmp_path)
    R, untrained = report["matrix"], report["untrained"]
    assert R[0] == untrained  # nothing trained during task 0
    assert R[1][0] > 90 and R[1][1] > 90  # the union, trained once at the last task
    s = report["summary"]
    # a Joint task start changes nothing, so Mammoth's FWT is 0; the class-IL GEM FWT is 0 by construction
    assert s["fwt_mammoth"] == 0.0 and s["fwt"] == 0.0 and "forgetting_chaudhry" in s
    points = report["metrics"]["accuracy"]["task_start"]
    assert points["before"][1] == points["after"][1] and points["before"][0] is None


def test_a_single_task_joint_is_the_joint_reference_under_both_schedules(run_fit, tmp_path):
    from tests.conftest import read_reports

    scores = []
    for schedule in ("cumulative", "last"):
        root = tmp_path / schedule
        one = (
            "--data.init_args.num_tasks=1",
            "--task_switch.epochs_per_task=2",
            f"--model.init_args.schedule={schedule}",
        )
        run_fit("classification/joint_splitdigits.yaml", root, *one)
        (report,) = read_reports(root)
        ((score,),) = report["matrix"]
        scores.append(score)
    assert scores[0] == scores[1] and scores[0] > 90  # the only task is the last: both train on all ten classes
