"""`Throughput`: channels-last and torch.compile applied in place to a method's compute modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from callbacks import Throughput
from cli.errors import ConfigError
from datamodules.base import TaskStream
from datamodules.rewards import RewardDataModule
from lightning_modules import LMSRR, LoRAGroup
from lightning_modules.base import ContinualModule
from tests.lightning_modules.test_reward_tuning import _unet_out

STREAM = TaskStream(task_names=("a", "b"), classes_per_task=(2, 2), input_shape=(3, 32, 32))


def test_channels_last_stores_the_unets_conv_weights_channels_last_and_keeps_its_outputs():
    torch.manual_seed(0)
    dm = RewardDataModule(rewards=["brightness"], resolution=64)
    model = LoRAGroup(stream=dm.stream, eval_inference_steps=2, eval_samples_per_prompt=1).eval()
    before = _unet_out(model)
    convs = [m for m in model.parts.unet.modules() if isinstance(m, nn.Conv2d)]
    assert convs and not all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    Throughput(channels_last=True).setup(None, model, "fit")
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not Throughput.compiled(model.parts.unet)
    torch.testing.assert_close(_unet_out(model), before, atol=1e-5, rtol=0)


def test_compile_wraps_every_lmsrr_block_in_place_with_names_and_outputs_unchanged():
    torch.manual_seed(0)
    model = LMSRR(
        stream=STREAM,
        buffer_size=4,
        minibatch_size=2,
        backbone_args={"sources": [{"name": "hf_vit", "args": {"preset": "tiny", "trainable_blocks": 1}}]},
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    keys = list(model.state_dict())
    blocks = model.compute_modules()
    source = model.backbone.sources[0]
    assert len(blocks) == len(source.frozen_blocks) + len(source.blocks) > 1
    callback = Throughput(compile={"backend": "eager"})
    callback.setup(None, model, "fit")
    callback.setup(None, model, "test")  # fit then test on one trainer applies once
    assert all(Throughput.compiled(b) for b in blocks.values())
    assert not Throughput.compiled(model.head)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


def test_the_families_name_their_compute_modules():
    model = LMSRR(stream=STREAM, buffer_size=4, minibatch_size=2)
    names = set(model.compute_modules())
    assert names and all(n.startswith("source_") for n in names)
    dm = RewardDataModule(rewards=["brightness"], resolution=64)
    group = LoRAGroup(stream=dm.stream, eval_inference_steps=2)
    assert group.compute_modules() == {"unet": group.parts.unet}


def test_options_off_touch_nothing_and_bad_options_say_which():
    class Plain(ContinualModule):
        pass

    module = Plain(stream=STREAM)
    Throughput().setup(None, module, "fit")  # both off: nothing asked of the module
    with pytest.raises(ConfigError, match="names no compute_modules"):
        Throughput(channels_last=True).setup(None, module, "fit")
    with pytest.raises(ConfigError, match=r"throughput.compile: unknown torch.compile argument\(s\) modee"):
        Throughput(compile={"modee": "max-autotune"})
    assert Throughput(compile=True).compile_args == {}
    assert Throughput(compile={"mode": "reduce-overhead"}).compile_args == {"mode": "reduce-overhead"}
