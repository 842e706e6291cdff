"""RORem, its discriminator and the data engine on the tiny preset: the loss against a hand computation, what
trains, what a checkpoint holds, and a data-engine round that accepts exactly what its judge passes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from callbacks import ContinualMetrics, DataEngine
from datamodules.removal import RemovalDataModule
from lightning_modules.nn.diffusion.inpainting import condition_latents, nine_channels
from lightning_modules.removal import RemovalDiscriminator, RORem


def data(**extra) -> RemovalDataModule:
    rounds = [
        {"name": "first", "train": "embedded:digits-on-photos", "inputs": "embedded:digits-on-photos",
         "eval": "embedded:digits-on-photos"},
        {"name": "second", "eval": "embedded:patches-on-photos"},
    ]  # fmt: skip
    return RemovalDataModule(rounds=rounds, counts={"train": 8, "inputs": 6, "eval": 2}, batch_size=2, **extra)


@pytest.fixture(scope="module")
def dm():
    return data()


def batch_of(dataset, n: int) -> dict:
    items = [dataset[i] for i in range(n)]
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


def test_rorem_loss_is_the_epsilon_mse_on_the_nine_channel_input(dm):
    model = RORem(stream=dm.stream)
    batch = batch_of(dm.train_dataset(0), 2)
    model.log = lambda *a, **k: None
    torch.manual_seed(5)
    loss = model.training_step(batch, 0)
    # By hand, drawing the same random numbers in the same order.
    parts = model.parts
    torch.manual_seed(5)
    with torch.no_grad():
        latents = parts.encode_images(batch["target"])  # the ground truth's latents
        small, masked = condition_latents(parts, batch["source"], batch["mask"])  # the masked source's
    noise = torch.randn(latents.shape)
    t = torch.randint(0, 1000, (2,))
    alpha = parts.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    context, pooled = parts.encode_prompt([""])  # the encoded empty prompt, not zeros
    with torch.no_grad():
        pred = parts.predict(
            nine_channels(noisy, small, masked), t, context.expand(2, -1, -1), pooled.expand(2, -1), 32
        )
    assert parts.prediction_type == "epsilon"
    assert loss.item() == pytest.approx(F.mse_loss(pred, noise).item(), rel=1e-5)


def test_rorem_trains_the_whole_unet_and_checkpoints_only_it(dm):
    model = RORem(stream=dm.stream)
    unet = set(model.parts.unet.parameters())
    assert set(model.trainable_parameters()) == unet and all(p.requires_grad for p in unet)
    frozen = [model.parts.vae, model.parts.text_encoder, model.parts.text_encoder_2]
    assert not any(p.requires_grad for part in frozen for p in part.parameters())
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and all(k.startswith("parts.unet.") for k in checkpoint["state_dict"])


def test_the_discriminator_trains_only_its_lora_and_head(tmp_path):
    judged = RemovalDataModule(
        rounds=[{"train": "embedded:digits-on-photos-judged", "eval": "embedded:digits-on-photos-judged"}],
        counts={"train": 8, "inputs": 0, "eval": 4},
        need_score=True,
    )
    model = RemovalDiscriminator(stream=judged.stream)
    trainable = {id(p) for p in model.trainable_parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in trainable]
    assert names and all(".lora_" in n or ".head." in n for n in names)
    assert not any(p.requires_grad for p in model.parameters() if id(p) not in trainable)
    assert len(model.parts.unet.up_blocks) == 0  # cut after the mid block
    model.log = lambda *a, **k: None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    loss = model.training_step(batch_of(judged.train_dataset(0), 4), 0)
    loss.backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert moved and moved <= set(names)
    scores = model.eval_step(batch_of(judged.eval_dataset(0), 4), 0)
    assert set(scores) == {"accuracy", "accuracy_90", "squared_error", "score"}
    assert (scores["score"] >= 0).all()


class FakeTrainer(SimpleNamespace):
    pass


def test_a_data_engine_round_accepts_exactly_the_removals_its_judge_passes(dm, monkeypatch):
    model = RORem(stream=dm.stream)
    model.scorer = object()  # the engine only asks for scores through `score`
    inputs = dm.round_inputs(0)
    n = len(inputs)
    wanted = torch.linspace(0.0, 1.0, n)  # known scores by input index

    def remove(source, mask, seeds):
        return -source  # a recognisable "removal"

    def score(source, mask, edited, seeds):
        index = [next(i for i in range(n) if torch.equal(torch.as_tensor(inputs[i]["source"]), s)) for s in source]
        return wanted[index]

    monkeypatch.setattr(model, "remove", remove)
    monkeypatch.setattr(model, "score", score)
    metrics = ContinualMetrics()
    trainer = FakeTrainer(
        datamodule=dm, global_rank=0, world_size=1, callbacks=[metrics], logger=None, is_global_zero=True,
        global_step=0,
    )  # fmt: skip
    engine = DataEngine(judge="discriminator", threshold=0.5, batch_size=4)
    engine.on_task_training_end(trainer, model, 0)
    keep = wanted >= 0.5
    assert dm.accepted_count(0) == int(keep.sum()) == metrics.extra["data_engine"]["first"]["accepted"]
    accepted = dm.train_dataset(1)
    sources = torch.stack([torch.as_tensor(inputs[i]["source"]) for i in range(n)])[keep]
    got = batch_of(accepted, len(accepted))
    assert torch.equal(got["source"], sources) and torch.equal(got["target"], -sources)
    assert torch.equal(got["score"], wanted[keep])
    stats = engine.rounds["first"]
    assert stats["processed"] == n and stats["acceptance_rate"] == pytest.approx(float(keep.float().mean()))
    # Judged by the "human" (the ground truth), -source is far from the background: nothing is accepted.
    DataEngine(judge="human").on_task_training_end(trainer, model, 0)
    assert dm.accepted_count(0) == 0
