"""`lifelong remove` and `lifelong score` on the tiny preset: the removals are the model's own (same seeds),
written as a RORem folder that check-data and the discriminator's reader accept, and scored as D_phi scores."""

from __future__ import annotations

import json

import pytest
import torch

from cli.main import main
from datamodules.removal import EncodedTriplets, read_meta, write_embedded_removal
from tests.conftest import config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name in ("rorem_tiny", "discriminator_tiny"):
        main(
            ["fit", "-c", config("trainer/cpu.yaml"), "-c", config(f"removal/{name}.yaml")]
            + ["--trainer.default_root_dir", str(root / name), "--continual_metrics.print_tables=false"]
            + ["--trainer.enable_progress_bar=false", "--task_switch.steps_per_task=2"]
        )
    return root


def test_remove_writes_the_models_removals_as_labelled_rorem_data_and_score_reads_them(trained, tmp_path, capsys):
    inputs = write_embedded_removal(tmp_path / "in", "digits-on-photos", "test", 3, 0)
    ckpt = trained / "rorem_tiny" / "checkpoints" / "last.ckpt"
    main(["remove", "-c", config("removal/rorem_tiny.yaml"), "--ckpt_path", str(ckpt)]
         + ["--meta", str(inputs), "--out", str(tmp_path / "out"), "--seed", "7"])  # fmt: skip
    entries = read_meta(tmp_path / "out" / "meta.json", need_score=True)  # GT: the removal; score: its judgement
    assert len(entries) == 3 and all(e.score in (0.0, 1.0) for e in entries)
    # The same removals from the model built as fit builds it, with the same per-image seeds.
    from cli.diffusion import build, load_weights
    from lightning_modules.removal import RORem

    model, dm, settings = build([config("removal/rorem_tiny.yaml")], [], RORem, "RORem")
    load_weights(model, str(ckpt), None, settings)
    data = EncodedTriplets(read_meta(inputs), 32)
    batch = {k: torch.stack([data[i][k] for i in range(3)]) for k in ("source", "mask")}
    expected = model.eval().remove(batch["source"], batch["mask"], [7, 8, 9])
    written = EncodedTriplets(entries, 32)
    for i in range(3):
        assert torch.allclose(written[i]["target"], expected[i], atol=2 / 255 + 1e-6)  # 8-bit PNG rounding
        assert torch.allclose(written[i]["source"], batch["source"][i], atol=1e-6)
    main(["check-data", str(tmp_path / "out" / "meta.json"), "--need_score"])
    assert "ok: 3 entries" in capsys.readouterr().out
    d_ckpt = trained / "discriminator_tiny" / "checkpoints" / "last.ckpt"
    main(["score", "-c", config("removal/discriminator_tiny.yaml"), "--ckpt_path", str(d_ckpt)]
         + ["--meta", str(tmp_path / "out" / "meta.json"), "--out", str(tmp_path / "scores.json")])  # fmt: skip
    report = json.loads((tmp_path / "scores.json").read_text())
    scores = list(report["scores"].values())
    assert len(scores) == 3 and all(s >= 0 for s in scores)
    assert report["success_0.5"] == pytest.approx(sum(s >= 0.5 for s in scores) / 3)
    assert report["labelled"] == 3 and 0 <= report["agreement_0.5"] <= 1


def test_remove_with_4_steps_takes_the_lcm_sampler_of_a_stages_model(tmp_path):
    """`--steps 4` on a model with an lcm adapter removes with the fast sampler (diffusers' LCMScheduler with the
    student on; untrained here, so the base UNet): the written removals are its fast ones, not the 4-step
    removals of RORem's pipeline."""
    from cli.diffusion import build
    from lightning_modules.removal import RemovalStages

    inputs = write_embedded_removal(tmp_path / "in", "digits-on-photos", "test", 2, 0)
    stages = config("removal/stages_tiny.yaml")
    main(["remove", "-c", stages, "--meta", str(inputs), "--out", str(tmp_path / "out"), "--steps", "4"])
    written = EncodedTriplets(read_meta(tmp_path / "out" / "meta.json"), 32)
    model, _, _ = build([stages], [], RemovalStages, "RemovalStages")
    data = EncodedTriplets(read_meta(inputs), 32)
    batch = {k: torch.stack([data[i][k] for i in range(2)]) for k in ("source", "mask")}
    fast = model.eval().remove(batch["source"], batch["mask"], [0, 1], 4, sampler="fast")
    full = model.remove(batch["source"], batch["mask"], [0, 1], 4, sampler="full")
    assert not torch.allclose(fast, full, atol=0.05)
    assert all(torch.allclose(written[i]["target"], fast[i], atol=2 / 255 + 1e-6) for i in range(2))
