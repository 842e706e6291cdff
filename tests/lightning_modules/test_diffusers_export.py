"""`lifelong export --format diffusers`: a stock diffusers StableDiffusionPipeline, built from the tiny base
saved as a diffusers folder, loads each method's export (LoRA or K/V weights, token files) and samples what
the suite samples for the same prompt, seed and steps."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("diffusers")

from cli.diffusion import write_diffusers_export  # noqa: E402
from cli.errors import ConfigError  # noqa: E402
from lightning_modules.diffusion import CustomDiffusion, R2MoE, SequentialLoRA  # noqa: E402
from lightning_modules.nn.diffusion.components import save_tiny  # noqa: E402
from lightning_modules.nn.diffusion.sampling import ddim_scheduler  # noqa: E402
from tests.lightning_modules.test_r2moe import stream  # noqa: E402
from tests.lightning_modules.test_sampling import perturb  # noqa: E402

SETTINGS = dict(num_inference_steps=3, guidance_scale=6.0, eta=1.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("sd") / "tiny"))


def stock_pipeline(base: str):
    """The stock pipeline from the saved folder (local files only), sampling with the suite's DDIM settings."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, local_files_only=True)
    pipe.scheduler = ddim_scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_images(pipe, prompt: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, height=64, width=64, generator=generator, output_type="pt", **SETTINGS).images


def sequential_lora() -> SequentialLoRA:
    torch.manual_seed(0)
    model = SequentialLoRA(stream(2)).eval()
    model.current_task = 1
    with torch.no_grad():  # B is zero at init: random values so the export is not a no-op
        for p in [*model.lora_parameters(), *model.concept_tokens.rows]:
            p.add_(0.3 * torch.randn_like(p))
    return model


def custom_diffusion() -> CustomDiffusion:
    torch.manual_seed(0)
    model = CustomDiffusion(stream(2)).eval()
    model.current_task = 1
    with torch.no_grad():
        for p in [*model.kv_parameters(), *model.concept_tokens.rows]:
            p.add_(0.3 * torch.randn_like(p))
    return model


def r2moe() -> R2MoE:
    """Two finished concepts with random experts and routers; the spec's removal (tau 0.4) on them deletes
    some layer-experts, so the equivalent LoRAs have different ranks in different layers."""
    torch.manual_seed(0)
    model = R2MoE(stream(3), cfg_delta="both").eval()
    for t in range(2):
        perturb(model, t)
        model.on_task_end(t)
    return model


def load_tokens(pipe, out: str, concepts: list[dict]) -> None:
    for concept in concepts:
        pipe.load_textual_inversion(os.path.join(out, concept["token_file"]))


@pytest.mark.parametrize("method", ["sequential_lora", "custom_diffusion", "r2moe"])
def test_a_stock_pipeline_samples_what_the_suite_samples(base, tmp_path, method):
    """Tolerance: 1e-4 on images in [0, 1]. The LoRA and K/V exports run the same layers as the suite (0.0
    measured); R2MoE's LoRA computes (x [A_j]) [g_j B_j] where the suite computes x (sum_j g_j A_j B_j), a
    float32 reassociation (about 1e-6 measured after 3 steps). Differences from the base are about 0.3."""
    model = {"sequential_lora": sequential_lora, "custom_diffusion": custom_diffusion, "r2moe": r2moe}[method]()
    out = str(tmp_path / "export")
    manifest = write_diffusers_export(model, out)
    with open(os.path.join(out, "export.json")) as f:
        assert json.load(f) == manifest
    assert sorted(os.listdir(out)) == sorted([*manifest["files"], "export.json"])
    k = 1 if method == "r2moe" else 0
    concept = manifest["concepts"][k]
    prompt = f"a photo of a {concept['token']} {concept['class']}"
    gate = [model.stream.inference_gate_prompts[k]] if method == "r2moe" else None
    ours = model.generate([prompt], gate, seed=1, **SETTINGS)

    pipe = stock_pipeline(base)
    plain = stock_images(pipe, f"a photo of a {concept['class']}", seed=1)
    if method == "sequential_lora":
        pipe.load_lora_weights(out, weight_name=manifest["lora"])
        load_tokens(pipe, out, manifest["concepts"])
    elif method == "custom_diffusion":
        from safetensors.torch import load_file

        loaded = pipe.unet.load_state_dict(load_file(os.path.join(out, manifest["unet_kv"])), strict=False)
        assert not loaded.unexpected_keys
        load_tokens(pipe, out, manifest["concepts"])
    else:
        pipe.load_lora_weights(out, weight_name=concept["lora"])
        load_tokens(pipe, out, [concept])
        ranks = {n: layer.r["default_0"] for n, layer in pipe.unet.named_modules() if hasattr(layer, "lora_A")}
        assert len(set(ranks.values())) > 1 and set(ranks.values()) <= {4, 8}  # per-layer ranks (rank_pattern)
        u = model.gate_input(gate)
        for name, layer in zip(model.experts.names, model.experts.layers, strict=True):
            selected, _ = layer.gates(u, 1, False)
            assert ranks.get(name, 0) == 4 * sum(1 for j in selected if j > 0 and bool(layer.alive[j]))
    theirs = stock_images(pipe, prompt, seed=1)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert (theirs - plain).abs().max() > 0.05


def test_r2moe_export_needs_a_finished_concept_and_its_snippet_runs(base, tmp_path):
    model = R2MoE(stream(2))
    with pytest.raises(ConfigError, match="no concept has finished training yet"):
        write_diffusers_export(model, str(tmp_path / "none"))
    perturb(model, 0)
    model.on_task_end(0)
    manifest = write_diffusers_export(model, str(tmp_path / "one"), dtype="float16")
    (concept,) = manifest["concepts"]
    assert concept["lora"] == "cat.safetensors" and concept["gate_prompt"] == "photo of a <new1> cat"
    from safetensors.torch import load_file

    lora = load_file(str(tmp_path / "one" / "cat.safetensors"))
    assert lora and all(k.startswith("unet.") and v.dtype == torch.float16 for k, v in lora.items())
    snippet = "\n".join(manifest["load"])
    assert 'weight_name="cat.safetensors"' in snippet and "cat_token.safetensors" in snippet
    # the documented lines run as written, on the tiny base's folder (2 steps instead of 50, 64 px)
    snippet = snippet.replace("<a folder written by lightning_modules.nn.diffusion.components.save_tiny>", base)
    namespace = {}
    exec(snippet.replace("num_inference_steps=50", "num_inference_steps=2, height=64, width=64"), namespace)
    assert namespace["image"].size == (64, 64)
