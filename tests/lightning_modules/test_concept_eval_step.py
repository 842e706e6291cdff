"""The evaluation step of the concept methods: which gate prompt routes the images, and the metrics it reports."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from datamodules.concepts import ConceptStream  # noqa: E402
from lightning_modules.diffusion import R2MoE  # noqa: E402

STREAM = ConceptStream(
    task_names=("cat", "cup"),
    tokens=("<new1>", "<new2>"),
    classes=("cat", "cup"),
    gate_prompts=("photo of a <new1> cat, close-up of the face", "photo of a <new2> cup, on a saucer"),
    resolution=64,
    inference_gate_prompts=("photo of a <new1> cat", "photo of a <new2> cup"),
)


def test_eval_step_routes_by_the_inference_gate_and_reports_dino_i(monkeypatch):
    torch.manual_seed(0)
    model = R2MoE(STREAM, dino_model="tiny", eval_samples_per_prompt=2, log_images=False)
    generated = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls = []

    def generate(prompts, gate_prompts=None, **kwargs):
        calls.append((list(prompts), list(gate_prompts)))
        return generated

    monkeypatch.setattr(model, "generate", generate)
    reference = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    batch = {"prompt": ["a <new2> cup on a beach"], "prompt_plain": ["a cup on a beach"], "reference": reference[None]}
    scores = model.eval_step(batch, 1)
    assert calls == [(["a <new2> cup on a beach"] * 2, ["photo of a <new2> cup"] * 2)]  # not the caption
    assert list(scores) == ["clip_i", "clip_t", "dino_i"]  # CLIP-I stays the primary metric
    assert torch.equal(scores["dino_i"], model.dino.dino_i(generated, reference))
    assert torch.equal(scores["clip_i"], model.clip.clip_i(generated, reference))
    without = R2MoE(STREAM, eval_samples_per_prompt=2, log_images=False)  # dino_model None: skipped
    monkeypatch.setattr(without, "generate", generate)
    assert without.dino is None and list(without.eval_step(batch, 1)) == ["clip_i", "clip_t"]
