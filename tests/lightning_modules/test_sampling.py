"""Sampling through diffusers' stock StableDiffusionPipeline gives, bit for bit, what the suite's former
hand-written DDIM + CFG loop gave (kept here as the reference), routed (R2MoE) and composed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from lightning_modules.diffusion import R2MoE  # noqa: E402
from lightning_modules.nn.diffusion.sampling import ddim_scheduler  # noqa: E402
from tests.lightning_modules.test_r2moe import stream  # noqa: E402

PROMPTS = ["a photo of a <new1> cat", "a <new2> cup on a table"]
STEPS = 3


def perturb(model, task_id: int, scale: float = 0.5) -> None:
    """Random non-trivial values for everything task `task_id` trains (expert, router, token)."""
    g = torch.Generator().manual_seed(task_id)
    with torch.no_grad():
        for p in model.task_parameters(task_id):
            p.add_(scale * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def model() -> R2MoE:
    """Two finished concepts with random experts and routers, every layer-expert kept."""
    torch.manual_seed(0)
    m = R2MoE(stream(3), removal_threshold=0.0, eval_inference_steps=STEPS).eval()
    for t in range(2):
        perturb(m, t)
        m.on_task_end(t)
    return m


def reference_sample(model, cond, uncond, size, seed, num_inference_steps, guidance_scale, eta):
    """The suite's former DDIM + CFG loop (routing held by the caller), decoded as `_sample` decodes."""
    scheduler = ddim_scheduler(model.parts.noise_scheduler, num_inference_steps or model.eval_inference_steps)
    generator = torch.Generator().manual_seed(seed)
    batch = cond.shape[0]
    latents = torch.randn((batch, model.parts.unet.config.in_channels, size, size), generator=generator)
    latents = latents * scheduler.init_noise_sigma
    context = torch.cat([uncond.expand(batch, -1, -1), cond])
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_u, eps_c = model.parts.unet(model_input, t, context).sample.chunk(2)
        noise = torch.randn(latents.shape, generator=generator) if eta > 0 else None
        eps = eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(eps, t, latents, eta=eta, variance_noise=noise).prev_sample
    return model.parts.decode_latents(latents)


@pytest.fixture
def reference(model, monkeypatch):
    """Runs `fn` with the module's sampler swapped for the reference loop."""

    def run(fn):
        with monkeypatch.context() as m:
            m.setattr(model, "_sample", lambda *args: reference_sample(model, *args))
            return fn()

    return run


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("gated", [True, False])
def test_pipeline_sampling_is_the_reference_loop_bit_for_bit(model, reference, eta, gated):
    gates = ["photo of a <new1> cat"] * 2 if gated else None  # without: the batch's mean context routes

    def sample():
        return model.generate(PROMPTS, gates, seed=3, num_inference_steps=STEPS, guidance_scale=6.0, eta=eta)

    images = sample()
    assert torch.equal(images, reference(sample))
    if gated:  # the routing is live: another concept's gate gives other images
        other = model.generate(PROMPTS, ["photo of a <new2> cup"] * 2, seed=3, guidance_scale=6.0, eta=eta)
        assert (other - images).abs().max() > 1e-3


def test_composition_through_the_pipeline_is_the_reference_loop_bit_for_bit(model, reference):
    masks = torch.zeros(2, 1, 32, 32)
    masks[0, ..., :16], masks[1, ..., 16:] = 1, 1

    def compose():
        regions, gates = ["a <new1> cat", "a <new2> cup"], ["photo of a <new1> cat", "photo of a <new2> cup"]
        return model.compose(regions, gates, masks, "a kitchen", 2, seed=5, guidance_scale=6.0, eta=1.0)

    assert torch.equal(compose(), reference(compose))


def test_guidance_at_most_one_samples_the_conditional_prediction_alone(model, reference):
    """As diffusers: no CFG batch at guidance_scale <= 1, so 0.5 and 1 give the same images; at 1 the old
    loop's eps_u + 1 (eps_c - eps_u) equals eps_c up to rounding."""
    gates = ["photo of a <new1> cat"] * 2

    def sample(w):
        return model.generate(PROMPTS, gates, seed=3, guidance_scale=w, eta=1.0)

    at_one = sample(1.0)
    assert torch.equal(at_one, sample(0.5))
    torch.testing.assert_close(at_one, reference(lambda: sample(1.0)), atol=1e-5, rtol=0)
    assert (at_one - sample(6.0)).abs().max() > 1e-3


def test_cfg_delta_both_also_routes_the_unconditional_half(model, monkeypatch):
    gates = ["photo of a <new1> cat"] * 2

    def sample(w):
        return model.generate(PROMPTS, gates, seed=3, guidance_scale=w, eta=0.0)

    conditional, conditional_no_cfg = sample(6.0), sample(1.0)
    with monkeypatch.context() as m:
        m.setattr(model, "cfg_delta", "both")
        both, both_no_cfg = sample(6.0), sample(1.0)
    assert (both - conditional).abs().max() > 1e-3
    assert torch.equal(both_no_cfg, conditional_no_cfg)  # without CFG the one batch is conditional: routed either way
