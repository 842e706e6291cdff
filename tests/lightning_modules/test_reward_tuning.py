"""Reward-gradient tuning: truncated gradients, the LoRA group's task start, the EMA teacher, and the reward
stream's bad input."""

from __future__ import annotations

import pytest
import torch

from callbacks.ema_teacher import EMATeacher
from callbacks.expert_freezing import ExpertFreezing
from cli.errors import ConfigError
from datamodules.rewards import RewardDataModule
from lightning_modules.nn.diffusion.reward_sampling import ddim_with_truncated_grad, first_grad_step
from lightning_modules.nn.diffusion.sampling import ddim_scheduler

STEPS = 5


def _toy_run(w: torch.Tensor, grad_from: int, calls: list[bool] | None = None) -> torch.Tensor:
    """A DDIM run of a 'UNet' eps = w * x from fixed noise; returns the final latents."""
    from diffusers import DDPMScheduler

    from lightning_modules.nn.diffusion.components import SD_SCHEDULE

    def unet(x, t):
        if calls is not None:
            calls.append(torch.is_grad_enabled())
        return w * x

    scheduler = ddim_scheduler(DDPMScheduler(**SD_SCHEDULE), STEPS)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    return ddim_with_truncated_grad(unet, scheduler, x, 1.0, 0.0, grad_from)


def test_gradients_flow_through_the_last_k_steps_only():
    calls: list[bool] = []
    w = torch.tensor(0.3, requires_grad=True)
    _toy_run(w, STEPS - 1, calls).sum().backward()
    assert calls == [False] * (STEPS - 1) + [True]
    draft_1 = w.grad.clone()

    # The same gradient as one step with grad from the detached state the earlier steps reached.
    from diffusers import DDPMScheduler

    from lightning_modules.nn.diffusion.components import SD_SCHEDULE

    scheduler = ddim_scheduler(DDPMScheduler(**SD_SCHEDULE), STEPS)
    x = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    w2 = torch.tensor(0.3, requires_grad=True)
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            x = scheduler.step(w2 * x, t, x, eta=0.0).prev_sample
    t = scheduler.timesteps[-1]
    scheduler.step(w2 * x, t, x, eta=0.0).prev_sample.sum().backward()
    assert torch.allclose(draft_1, w2.grad)

    w3 = torch.tensor(0.3, requires_grad=True)
    _toy_run(w3, 0).sum().backward()  # full backpropagation: earlier steps add to the gradient
    assert not torch.allclose(w3.grad, draft_1)


def test_the_truncation_point():
    assert first_grad_step(50, "draft", 1, 0.84, 0.1) == 49
    assert first_grad_step(50, "draft", 80, 0.84, 0.1) == 0
    points = [first_grad_step(50, "alignprop", 1, 0.84, 0.1, torch.Generator().manual_seed(s)) for s in range(200)]
    assert all(0 <= p <= 49 for p in points)
    assert abs(sum(points) / len(points) - 42) < 1.5  # AlignProp's 42 +- 5 of 50


@pytest.fixture(scope="module")
def rid():
    from lightning_modules import RID

    dm = RewardDataModule(rewards=["compressibility", "brightness"], resolution=16, batch_size=2)
    model = RID(stream=dm.stream, train_inference_steps=3, eval_inference_steps=3, eval_samples_per_prompt=1)
    model.log = lambda *args, **kwargs: None
    return model


def _unet_out(model) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = model.parts.encode_text(["a handwritten digit two"])
    with torch.no_grad():
        return model.parts.unet(x, torch.tensor([500]), ctx).sample


def test_a_new_reward_starts_from_the_previous_model_with_the_teacher_equal_to_the_student(rid):
    ema = EMATeacher(momentum=0.5)
    rid.on_task_start(0)
    ExpertFreezing.apply(rid, 0)
    ema.reset(rid)
    opt = torch.optim.SGD(rid.task_parameters(0), lr=1.0)
    loss = rid.training_step({"prompt": ["a handwritten digit two", "a handwritten digit three"]}, 0)
    loss.backward()
    opt.step()
    assert _unet_out(rid).abs().sum() > 0
    after_first = _unet_out(rid)
    adapter_0 = {k: v.detach().clone() for k, v in rid.adapter_parameters("reward_0").items()}
    assert any(k.endswith("lora_B.reward_0.weight") and v.abs().sum() > 0 for k, v in adapter_0.items())

    rid.on_task_start(1)
    ExpertFreezing.apply(rid, 1)
    ema.reset(rid)
    assert torch.equal(_unet_out(rid), after_first)  # the new adapter's B is 0
    assert all(v.abs().sum() == 0 for k, v in rid.adapter_parameters("reward_1").items() if ".lora_B." in k)
    assert ema.weights.keys() == rid.adapter_parameters("reward_1").keys()
    assert all(torch.equal(ema.weights[k], p) for k, p in rid.adapter_parameters("reward_1").items())
    assert not any(p.requires_grad for p in rid.adapter_parameters("reward_0").values())

    # The EMA update is teacher <- m teacher + (1 - m) student.
    before = {k: v.clone() for k, v in ema.weights.items()}
    opt = torch.optim.SGD(rid.task_parameters(1), lr=1.0)
    loss = rid.training_step({"prompt": ["a handwritten digit two", "a handwritten digit three"]}, 0)
    loss.backward()
    opt.step()
    ema.update(rid)
    for k, p in rid.adapter_parameters("reward_1").items():
        assert torch.allclose(ema.weights[k], 0.5 * before[k] + 0.5 * p.detach())
    # The frozen adapter of the first reward did not move.
    assert all(torch.equal(v, adapter_0[k]) for k, v in rid.adapter_parameters("reward_0").items())


def test_the_distillation_term_is_zero_while_teacher_and_student_agree_and_not_after(rid):
    rid.on_task_start(1)
    ema = EMATeacher(momentum=0.9)
    ema.reset(rid)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.cat([rid.parts.encode_text([""] * 2), rid.parts.encode_text(["a", "b"])])
    t = torch.tensor(300)
    pred = rid.parts.unet(torch.cat([x, x]), t, ctx).sample
    assert rid.step_losses(0, torch.cat([x, x]), t, pred, ctx)["distill"].item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        for k, p in rid.adapter_parameters("reward_1").items():
            if ".lora_B." in k:
                p.add_(0.1)
    pred = rid.parts.unet(torch.cat([x, x]), t, ctx).sample
    assert rid.step_losses(0, torch.cat([x, x]), t, pred, ctx)["distill"].item() > 0
    with torch.no_grad():
        for k, p in rid.adapter_parameters("reward_1").items():
            if ".lora_B." in k:
                p.zero_()


def test_rid_without_its_teacher_callback_is_one_line():
    from lightning_modules import RID

    dm = RewardDataModule(rewards=["brightness"], resolution=16)
    model = RID(stream=dm.stream, train_inference_steps=2, eval_inference_steps=2)
    with pytest.raises(ConfigError, match="add callbacks.EMATeacher to trainer.callbacks"):
        model.training_step({"prompt": ["a", "b"]}, 0)


def test_bad_reward_streams_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"data.rewards\[0\].name: unknown reward 'beauty'; choose one of"):
        RewardDataModule(rewards=["beauty"])
    with pytest.raises(ConfigError, match=r"data.rewards\[0\]: unknown key 'prompt'"):
        RewardDataModule(rewards=[{"name": "brightness", "prompt": "digits"}])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match=rf"data.rewards\[1\].prompts: {empty} holds no prompt"):
        RewardDataModule(rewards=["brightness", {"name": "contrast", "prompts": str(empty)}])
    with pytest.raises(ConfigError, match=r"eval_prompts: 'nowhere.txt' is neither an embedded prompt set"):
        RewardDataModule(rewards=[{"name": "contrast", "eval_prompts": "nowhere.txt"}])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red apple\n\na blue car\n")
    dm = RewardDataModule(rewards=[{"name": "contrast", "prompts": str(prompts)}, "contrast"])
    assert dm.train_prompts(0) == ("a red apple", "a blue car")
    assert dm.task_names == ["contrast_0", "contrast_1"]


def _perturbed_group(tasks: int = 2):
    """A LoRA group whose first `tasks` adapters are non-zero (B is zero at init)."""
    from lightning_modules import LoRAGroup

    torch.manual_seed(0)
    dm = RewardDataModule(rewards=["brightness", "contrast", "colourfulness"], resolution=64)
    model = LoRAGroup(stream=dm.stream, eval_inference_steps=3, eval_samples_per_prompt=1).eval()
    with torch.no_grad():
        for t in range(tasks):
            for p in model.adapter_parameters(f"reward_{t}").values():
                p.add_(0.3 * torch.randn_like(p))
    model.current_task = tasks - 1
    return model


def test_lora_merge_folds_non_zero_adapters_in_and_takes_them_out():
    from callbacks import LoRAMerge

    model = _perturbed_group()
    weights = {n: p.detach().clone() for n, p in model.parts.unet.named_parameters() if "base_layer" in n}
    with model.base_model():
        plain = _unet_out(model)
    adapted = _unet_out(model)
    effect = (adapted - plain).abs().max().item()
    assert effect > 0.1
    # Merging reassociates float sums, so outputs differ by ~1e-4 depending on the CPU's kernels;
    # 1% of the adapters' own effect still tells a merged model from an unmerged or doubled one.
    tol = 0.01 * effect

    merge = LoRAMerge()
    merge.on_task_training_end(None, model, 1)
    assert model.adapters_merged()
    changed = [
        n for n, p in model.parts.unet.named_parameters() if "base_layer" in n and not torch.equal(p, weights[n])
    ]
    assert changed  # the base weights now hold the deltas
    torch.testing.assert_close(_unet_out(model), adapted, atol=tol, rtol=0)
    with model.base_model():  # the base model is still reachable while merged
        torch.testing.assert_close(_unet_out(model), plain, atol=tol, rtol=0)
    assert model.adapters_merged()

    merge.on_task_start(None, model, 2)
    assert not model.adapters_merged()
    for n, p in model.parts.unet.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)
    torch.testing.assert_close(_unet_out(model), adapted, atol=tol, rtol=0)


def test_the_export_is_one_lora_a_stock_pipeline_samples_like_the_suite(tmp_path):
    import json
    import os

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from cli.diffusion import write_diffusers_export
    from lightning_modules.nn.diffusion.components import save_tiny

    model = _perturbed_group()
    base = save_tiny(str(tmp_path / "tiny"))
    out = str(tmp_path / "export")
    manifest = write_diffusers_export(model, out)
    assert manifest["lora"] == "lora.safetensors" and manifest["rewards"] == ["brightness", "contrast"]
    with open(os.path.join(out, "export.json")) as f:
        assert json.load(f) == manifest
    settings = dict(num_inference_steps=3, guidance_scale=5.0, eta=1.0)
    prompt = manifest["prompt"]
    ours = model.generate([prompt], seed=1, **settings)

    def stock(unet=None):
        from lightning_modules.nn.diffusion.sampling import ddim_scheduler

        extra = {"unet": unet} if unet is not None else {}
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, local_files_only=True, **extra)
        pipe.scheduler = ddim_scheduler(pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sample(pipe):
        g = torch.Generator().manual_seed(1)
        return pipe(prompt, height=64, width=64, generator=g, output_type="pt", **settings).images

    pipe = stock()
    plain = sample(pipe)
    pipe.load_lora_weights(out, weight_name=manifest["lora"])
    ranks = {layer.r["default_0"] for layer in pipe.unet.modules() if hasattr(layer, "lora_A")}
    assert ranks == {8}  # two rank-4 adapters as one rank-8 LoRA
    torch.testing.assert_close(sample(pipe), ours, atol=1e-4, rtol=0)
    assert (ours - plain).abs().max() > 0.05

    # The merged UNet folder: a plain UNet2DConditionModel, no adapter left, the same images.
    model.save_merged_unet(str(tmp_path / "merged"))
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert not any("lora" in n for n, _ in unet.named_parameters())
    torch.testing.assert_close(sample(stock(unet)), ours, atol=1e-4, rtol=0)
