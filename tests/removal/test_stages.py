"""The methods after RORem: LCM distillation (its boundary condition, its solver step against diffusers' DDIM,
its 4-step schedule), reward weights, Diffusion-DPO (its loss against a hand computation, a reference that
stays bit-identical), DDPO's per-step log-probability and PPO ratio, the LCM export in a stock pipeline, and
the whole stream killed and resumed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_modules.nn.diffusion.consistency import (
    alpha_bar,
    boundary_scalings,
    consistency_output,
    ddim_skeleton,
    ddim_solver_step,
    solver_timesteps,
    x0_and_eps,
)
from lightning_modules.nn.diffusion.policy import PerInputStats, ddim_step_with_log_prob, dpo_loss, ppo_loss
from lightning_modules.removal.lcm import effective_sample_size, reward_weights


def sdxl_schedule(cls, **extra):
    return cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, **extra)


# -- LCM -------------------------------------------------------------------------------------------------
def test_the_consistency_function_is_the_identity_at_t_0_and_matches_diffusers_scalings():
    from diffusers import LCMScheduler

    c_skip, c_out = boundary_scalings(torch.tensor([0, 19, 259, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    z, x0 = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    assert torch.equal(consistency_output(z, x0, torch.tensor([0])), z)
    assert c_skip[1] < 7e-6  # from t = 19 on, f is x0
    reference = sdxl_schedule(LCMScheduler)
    for t, a, b in zip([0, 19, 259, 999], c_skip, c_out, strict=True):
        skip, out = reference.get_scalings_for_boundary_condition_discrete(t)
        assert float(a) == pytest.approx(float(skip), rel=1e-6, abs=1e-12)
        assert float(b) == pytest.approx(float(out), rel=1e-6)


def test_the_solver_step_is_diffusers_ddim_step_on_the_50_step_skeleton():
    from diffusers import DDIMScheduler

    skeleton = ddim_skeleton(1000, 50)
    assert skeleton[:3].tolist() == [19, 39, 59] and skeleton[-1] == 999 and len(skeleton) == 50
    start, target = solver_timesteps(torch.tensor([0, 1, 49]))
    assert start.tolist() == [19, 39, 999] and target.tolist() == [0, 19, 979]
    ddim = sdxl_schedule(DDIMScheduler, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(50)
    torch.manual_seed(0)
    for i in (0, 1, 24, 49):
        s, t = solver_timesteps(torch.tensor([i]))
        z, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
        x0, e = x0_and_eps(eps, z, alpha_bar(ddim.alphas_cumprod, s, z))
        ours = ddim_solver_step(x0, e, alpha_bar(ddim.alphas_cumprod, t, z))
        theirs = ddim.step(eps, int(s), z, eta=0.0).prev_sample
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_the_4_step_lcm_schedule_is_the_specs_and_strength_099_drops_its_first_step(stages):
    model, _ = stages
    pipe = model.fast_pipeline
    pipe.scheduler.set_timesteps(4)
    assert pipe.scheduler.timesteps.tolist() == [999, 759, 499, 259]
    timesteps, n = pipe.get_timesteps(4, 0.99, "cpu")  # the released script's strength: 3 steps from t = 759
    assert timesteps.tolist() == [759, 499, 259] and n == 3


def test_reward_weights_are_self_normalised_as_the_spec_designs():
    r = torch.tensor([0.2, 0.95, 1.5, -0.1])
    soft = reward_weights(r, "softmax", temperature=0.5)
    assert soft.sum().item() == pytest.approx(4.0)  # B softmax(r / tau): mean 1
    clamped = torch.tensor([0.2, 0.95, 1.2, 0.0])  # r is clamped to [0, 1.2] first
    torch.testing.assert_close(soft, 4 * torch.softmax(clamped / 0.5, 0))
    assert reward_weights(r, "threshold", threshold=0.9).tolist() == [0, 1, 1, 0]
    assert reward_weights(torch.tensor([0.1, 0.2]), "threshold", 0.9).tolist() == [1, 1]  # none passes: uniform
    torch.testing.assert_close(reward_weights(r, "sigmoid", 0.5, 0.25), torch.sigmoid((clamped - 0.5) / 0.25))
    assert reward_weights(r, "softmax", temperature=0.01, clip=[0.1, 2.0]).tolist() == pytest.approx([0.1, 0.1, 2, 0.1])
    assert effective_sample_size(torch.ones(4)).item() == pytest.approx(4.0)
    assert effective_sample_size(torch.tensor([1.0, 0, 0, 0])).item() == pytest.approx(1.0)


# -- DPO and the policy ----------------------------------------------------------------------------------------
def test_the_dpo_loss_is_the_hand_computation_and_preferring_the_better_sample_lowers_it():
    w, lose, rw, rl = torch.tensor([0.1]), torch.tensor([0.3]), torch.tensor([0.2]), torch.tensor([0.3])
    loss, inside, accuracy = dpo_loss(w, lose, rw, rl, beta=10.0)
    # inside = -10 / 2 [(0.1 - 0.2) - (0.3 - 0.3)] = 0.5; loss = -log sigmoid(0.5) = log(1 + e^-0.5)
    assert inside.item() == pytest.approx(0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), rel=1e-6)
    assert accuracy.item() == 1.0
    worse, _, acc = dpo_loss(torch.tensor([0.3]), torch.tensor([0.1]), rw, rl, beta=10.0)
    assert worse.item() > math.log(2) > loss.item() and acc.item() == 0.0
    tie, _, acc = dpo_loss(rw, rl, rw, rl, beta=5000.0)  # policy = reference
    assert tie.item() == pytest.approx(math.log(2)) and acc.item() == 0.5


def test_the_ddim_log_prob_is_the_gaussian_density_of_diffusers_step():
    from lightning_modules.nn.diffusion.sampling import ddim_scheduler

    scheduler = ddim_scheduler(sdxl_schedule(__import__("diffusers").DDPMScheduler), 10)
    torch.manual_seed(1)
    x, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = scheduler.timesteps[3]
    seeded = torch.Generator().manual_seed(5)
    prev, log_prob, mean, std = ddim_step_with_log_prob(scheduler, eps, t, x, eta=1.0, generator=seeded)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(prev, scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample)
    density = torch.distributions.Normal(mean, std).log_prob(prev).flatten(1).mean(1)  # a mean over elements
    torch.testing.assert_close(log_prob, density)
    _, again, _, _ = ddim_step_with_log_prob(scheduler, eps, t, x, eta=1.0, prev_sample=prev)
    assert torch.equal(again, log_prob)


def test_the_ppo_objective_clips_and_the_stat_tracker_normalises_per_input():
    a = torch.tensor([1.0, -1.0])
    same = ppo_loss(torch.zeros(2), torch.zeros(2), a, 1e-4)
    assert torch.equal(same["ratio"], torch.ones(2)) and same["loss"].item() == 0.0 and same["clipfrac"] == 0
    moved = ppo_loss(torch.tensor([0.1, 0.1]), torch.zeros(2), a, 1e-4)
    # row 0: A > 0, ratio e^0.1 clipped to 1 + 1e-4; row 1: A < 0, the unclipped e^0.1 is the larger loss
    assert moved["loss"].item() == pytest.approx((-(1 + 1e-4) + math.exp(0.1)) / 2)
    assert moved["clipfrac"].item() == 1.0
    stats = PerInputStats(buffer_size=4, min_count=2)
    first = stats.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 2.0]))  # "a" has 2 >= min_count, "b" the batch's
    assert first[:2].tolist() == pytest.approx([-1 / (1 + 1e-6), 1 / (1 + 1e-6)])
    assert first[2].item() == pytest.approx(0.0)  # (2 - batch mean 2) / batch std
    restored = PerInputStats(4, 2)
    restored.load_state_dict(stats.state_dict())
    assert restored.update(["b"], torch.tensor([4.0])).item() == pytest.approx(1 / (1 + 1e-6))  # b: [2, 4]


# -- the module ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stages():
    """A tiny stream [discriminator, lcm, dpo, ppo] with rank-4 adapters."""
    from datamodules.removal import RemovalDataModule
    from lightning_modules.removal import RemovalStages
    from lightning_modules.removal.dpo import DPOSettings
    from lightning_modules.removal.lcm import LCMSettings
    from lightning_modules.removal.ppo import PPOSettings

    names = ["discriminator", "lcm", "dpo", "ppo"]
    rounds = [{"name": n, "train": "embedded:digits-on-photos", "eval": "embedded:digits-on-photos"} for n in names]
    dm = RemovalDataModule(rounds=rounds, counts={"train": 2, "inputs": 0, "eval": 2}, batch_size=2, train_on="current")
    dm.setup()
    model = RemovalStages(
        stream=dm.stream,
        stages=names,
        lcm=LCMSettings(rank=4, lora_alpha=4),
        dpo=DPOSettings(pairs="data"),
        ppo=PPOSettings(sample_steps=3, samples_per_input=2),
        policy_rank=4,
        policy_alpha=4,
        eval_inference_steps=3,
        log_images=False,
    )
    batch = next(iter(torch.utils.data.DataLoader(dm.train_dataset(1), batch_size=2)))
    return model, batch


def test_the_reference_stays_bit_identical_while_dpo_trains_the_policy_adapter_alone(stages):
    model, batch = stages
    model.on_task_start(2)  # the stage's flags and sampler are set as its task starts
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    (group,) = model.trainable_parameters()
    policy = model.adapter_parameters("policy")
    assert {n for n, on in flags.items() if on} == set(policy)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # the query changed nothing
    assert {id(p) for p in group["params"]} == {id(p) for p in policy.values()} and group["lr"] == model.dpo.lr
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in policy}
    before = {n: p.detach().clone() for n, p in policy.items()}
    pairs = dict(batch, rejected=batch["source"])  # the ground truth preferred to the object left in place
    cond = model.conditioning(batch)
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 500])
    with torch.no_grad(), model.using("reference"):
        reference = model.unet_output(z, cond, t)
    optimizer = torch.optim.AdamW(group["params"], lr=1e-3)
    loss = model.dpo_step(pairs)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # the adapter starts at zero: policy = reference
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n not in policy)
    assert any(not torch.equal(p, before[n]) for n, p in policy.items())
    with torch.no_grad():
        with model.using("reference"):
            assert torch.equal(model.unet_output(z, cond, t), reference)
        assert not torch.equal(model.unet_output(z, cond, t), reference)  # the policy did move


def test_the_lcm_step_trains_the_student_adapter_alone_and_the_ema_target_is_swapped_in_and_out(stages):
    model, batch = stages
    model.on_task_start(1)
    (group,) = model.trainable_parameters()
    student = model.adapter_parameters("lcm")
    assert {id(p) for p in group["params"]} == {id(p) for p in student.values()}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in student)
    loss = model.lcm_step(batch)
    loss.backward()
    assert all(p.grad is not None for n, p in student.items() if ".lora_A." in n)
    cond = model.conditioning(batch)
    z, t = torch.randn(2, 4, 16, 16), torch.tensor([259, 19])
    model.lcm.target = "ema"
    try:
        model.set_ema_teacher({n: p.detach().clone() for n, p in student.items()})
        with torch.no_grad():
            same = model.target_output(z, cond, t)
            torch.testing.assert_close(same, model.unet_output(z, cond, t))
            model.set_ema_teacher({n: torch.zeros_like(p) for n, p in student.items()})
            with model.using("full"):  # the sampler without the student (the policy adapter, if trained, on)
                base = model.unet_output(z, cond, t)
            torch.testing.assert_close(model.target_output(z, cond, t), base)  # a zero adapter adds nothing
            torch.testing.assert_close(model.unet_output(z, cond, t), same)  # the student's weights are back
    finally:
        model.lcm.target = "student"


def test_the_ppo_ratio_is_exactly_one_before_the_first_update(stages):
    model, batch = stages
    model.on_task_start(3)
    cond = model.conditioning(batch, repeat=2)
    latents, old, _ = model.sample_trajectories(cond)
    scheduler = model.ddim()
    assert latents.shape[0] == len(scheduler.timesteps) + 1 == 4
    for j, t in enumerate(scheduler.timesteps):
        prediction = model.unet_output(latents[j], cond, t)
        _, log_prob, _, _ = ddim_step_with_log_prob(scheduler, prediction, t, latents[j], 1.0, latents[j + 1])
        assert log_prob.requires_grad
        assert torch.equal(torch.exp(log_prob - old[j]), torch.ones(4))


def test_the_lcm_export_loads_into_a_stock_sdxl_inpainting_pipeline(stages, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLInpaintPipeline

    from lightning_modules.nn.diffusion.inpainting import save_inpainting, tiny_inpainting

    model, batch = stages
    with torch.no_grad():
        for n, p in model.adapter_parameters("lcm").items():
            if ".lora_B." in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    base = save_inpainting(tiny_inpainting(), str(tmp_path / "base"))  # the model's base (no stage changed it)
    manifest = model.save_diffusers(str(tmp_path / "export"))
    assert manifest["loras"] == {"lcm": "lcm_lora.safetensors", "policy": "policy_lora.safetensors"}
    assert "unet" not in manifest  # no rorem stage, nothing loaded: the UNet is the base's
    ours = model.remove(batch["source"], batch["mask"], [0, 1], sampler="fast")
    pipe = StableDiffusionXLInpaintPipeline.from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for name, file in manifest["loras"].items():  # the fast sampler runs the policy (trained above) and the student
        pipe.load_lora_weights(str(tmp_path / "export"), weight_name=file, adapter_name=name)
    pipe.set_adapters(["policy", "lcm"])
    pipe.fuse_lora()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=50)
    context, pooled = model.prompt_conditioning("")
    theirs = pipe(
        prompt_embeds=context.expand(2, -1, -1),
        pooled_prompt_embeds=pooled.expand(2, -1),
        image=(batch["source"] + 1) / 2,
        mask_image=batch["mask"],
        height=32,
        width=32,
        num_inference_steps=4,
        strength=1.0,
        guidance_scale=1.0,
        generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
        output_type="pt",
    ).images
    torch.testing.assert_close(theirs * 2 - 1, ours, atol=2e-4, rtol=0)
    model.merge_adapters()  # LoRAMerge's hook: each sampler's adapters folded in while the model only samples
    try:
        assert model.adapters_merged()
        merged = model.remove(batch["source"], batch["mask"], [0, 1], sampler="fast")
        assert model.adapters_merged()
    finally:
        model.unmerge_adapters()
    assert not model.adapters_merged()
    torch.testing.assert_close(merged, ours, atol=2e-4, rtol=0)
    loading = model.loading_snippet({**manifest, "base": "BASE"}, "OUT")
    assert 'pipe.load_lora_weights("OUT", weight_name="lcm_lora.safetensors", adapter_name="lcm")' in loading


# -- the stream through `lifelong fit`, killed and resumed -------------------------------------------------------
STREAM = (
    "--task_switch.steps_per_task=2",
    "--continual_metrics.print_tables=false",
    "--data.init_args.counts={train: 4, inputs: 0, eval: 1}",
    "--checkpoint.every_n_train_steps=1",
    "--model.init_args.eval_inference_steps=2",
    "--model.init_args.lcm.inference_steps=2",
    "--model.init_args.dpo.online_steps=2",
    "--model.init_args.ppo.sample_steps=2",
)


@pytest.mark.slow
def test_the_stream_of_all_methods_killed_inside_lcm_and_inside_ppo_resumes_to_the_uninterrupted_run(tmp_path):
    """RORem -> D_phi -> LCM -> DPO -> PPO, 2 steps each: a run killed after step 6 and after step 10 resumes from
    step 5 (inside lcm) and step 9 (inside ppo, its stat tracker holding a batch) and ends with the uninterrupted
    run's weights, matrices and tracker."""
    from tests.cli.test_resume import last_checkpoint, lifelong, signal_at
    from tests.conftest import fit_args, read_reports

    env = {"OMP_NUM_THREADS": "1"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = lifelong(fit_args("removal/stages_tiny.yaml", whole, *STREAM), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    args = fit_args("removal/stages_tiny.yaml", cut, *STREAM)
    for step in (6, 10):  # the step's own checkpoint is not written: the runs resume from steps 5 and 9
        resume = ["--ckpt_path", "last"] if step > 6 else []
        killed = lifelong(args + resume + signal_at("SIGKILL", step=step), env=env)
        assert killed.returncode == -9, killed.stderr[-3000:]
    assert last_checkpoint(cut)["global_step"] == 9 and last_checkpoint(cut)["advantage_stats"]["buffers"]
    resumed = lifelong(args + ["--ckpt_path", "last"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    x, y = last_checkpoint(whole), last_checkpoint(cut)
    assert x["global_step"] == y["global_step"] == 10
    assert x["state_dict"].keys() == y["state_dict"].keys()
    assert {k.split(".lora_")[1].split(".")[1] for k in x["state_dict"] if ".lora_" in k and "scorer" not in k} == {
        "lcm",
        "policy",
    }
    assert [k for k in x["state_dict"] if not torch.equal(x["state_dict"][k], y["state_dict"][k])] == []
    assert x["advantage_stats"] == y["advantage_stats"]
    (a,), reports = read_reports(whole), read_reports(cut)
    timed = "seconds_per_image"
    assert {k: v for k, v in reports[-1]["metrics"].items() if k != timed} == {
        k: v for k, v in a["metrics"].items() if k != timed
    }
    assert a["tasks"] == ["rorem", "discriminator", "lcm", "dpo", "ppo"]
    assert all(len(row) == 5 for row in a["metrics"]["gt_success"]["matrix"])
    assert json.dumps(a)  # a plain JSON report (no NaN from a metric some stage lacks)


def test_a_stage_starts_alone_from_a_rorem_checkpoint_and_its_checkpoint_carries_what_it_started_from(tmp_path):
    """LCMDistill with init_from = a RORem checkpoint (plain UNet keys): the UNet's weights land under peft's
    base_layer, the student starts at zero, and the run's delta holds the loaded UNet beside the adapter."""
    from datamodules.removal import RemovalDataModule
    from lightning_modules.removal import LCMDistill, RORem
    from lightning_modules.removal.lcm import LCMSettings

    rounds = [{"name": "r", "train": "embedded:digits-on-photos", "eval": "embedded:digits-on-photos"}]
    dm = RemovalDataModule(rounds=rounds, counts={"train": 2, "inputs": 0, "eval": 2})
    rorem = RORem(stream=dm.stream)
    with torch.no_grad():
        rorem.parts.unet.conv_in.weight.add_(1.0)
        rorem.parts.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight.mul_(2.0)
    path = tmp_path / "rorem.ckpt"
    torch.save({"state_dict": rorem.delta_state_dict()}, path)
    student = LCMDistill(stream=dm.stream, init_from=str(path), lcm=LCMSettings(rank=4, lora_alpha=4))
    to_q = student.parts.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert torch.equal(student.parts.unet.conv_in.weight, rorem.parts.unet.conv_in.weight)
    assert torch.equal(
        to_q.base_layer.weight, rorem.parts.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.weight
    )
    assert torch.count_nonzero(to_q.lora_B["lcm"].weight) == 0
    delta = student.delta_state_dict()
    assert "parts.unet.conv_in.weight" in delta and any(".lora_A.lcm." in k for k in delta)
    assert not any(".lora_A.policy." in k for k in delta) and student.adapters == ["lcm"]
    assert {id(p) for p in student.trainable_parameters()[0]["params"]} == {
        id(p) for p in student.adapter_parameters("lcm").values()
    }
