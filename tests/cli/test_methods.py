"""Every classification method trains two tiny tasks, and resumes to the same result."""

from __future__ import annotations

import glob
import os

import pytest
import torch

from tests.conftest import config, read_reports

METHODS = sorted(
    os.path.basename(p).removesuffix("_splitdigits.yaml")
    for p in glob.glob(config("classification/*_splitdigits.yaml"))
)
TINY = ("--data.init_args.num_tasks", "2", "--task_switch.steps_per_task", "6")


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_two_tasks_and_resumes_identically(run_fit, tmp_path, method):
    experiment = f"classification/{method}_splitdigits.yaml"
    run_fit(experiment, tmp_path / "full", *TINY)
    (full,) = read_reports(tmp_path / "full")
    assert len(full["matrix"]) == 2 and all(v is not None for row in full["matrix"] for v in row)
    run_fit(experiment, tmp_path / "cut", *TINY, "--task_switch.stop_after_task", "1")
    run_fit(experiment, tmp_path / "cut", *TINY, "--ckpt_path", "last")
    resumed = read_reports(tmp_path / "cut")[-1]
    for name, block in full["metrics"].items():
        for a, b in zip(block["matrix"], resumed["metrics"][name]["matrix"], strict=True):
            assert a == pytest.approx(b, abs=1e-6), (method, name)


def test_er_on_tiny_cifar_trains_and_resumes_with_augmentation(run_fit, tmp_path):
    """The real Split-CIFAR-10 config on tiny files in the CIFAR format: augmented batches, raw memory,
    and a resume that continues the augmentation draws where the uninterrupted run was."""
    from tests.datamodules.test_cifar import write_cifar10

    write_cifar10(tmp_path / "data")
    small = (
        f"--data.init_args.root={tmp_path / 'data'}",
        "--data.init_args.num_tasks=2",
        "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0",
        "--model.init_args.backbone_args={nf: 4}",
        "--model.init_args.minibatch_size=4",
        "--task_switch.steps_per_task=3",
    )
    experiment = "classification/er_cifar10.yaml"
    cli = run_fit(experiment, tmp_path / "full", *small)
    stored = cli.model.buffer.data["x"]
    assert stored.dtype == torch.float32 and 0.0 <= float(stored.min()) and float(stored.max()) <= 1.0  # raw images
    run_fit(experiment, tmp_path / "cut", *small, "--task_switch.stop_after_task", "1")
    run_fit(experiment, tmp_path / "cut", *small, "--ckpt_path", "last")
    (full,), resumed = read_reports(tmp_path / "full"), read_reports(tmp_path / "cut")[-1]
    for a, b in zip(full["matrix"], resumed["matrix"], strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_lmsrr_cifar10_config_trains_from_saved_vit_folders(run_fit, tmp_path):
    """The real LMSRR config, its two ViTs loaded from local folders (tiny ones saved here), on CIFAR files."""
    from transformers import ViTConfig, ViTModel

    from lightning_modules.nn.vit import HF_VIT_PRESETS
    from tests.datamodules.test_cifar import write_cifar10

    write_cifar10(tmp_path / "data")
    for name in ("vit_a", "vit_b"):
        ViTModel(ViTConfig(**HF_VIT_PRESETS["tiny"]), add_pooling_layer=False).save_pretrained(tmp_path / name)
    sources = ", ".join(
        f"{{name: hf_vit, args: {{path: {tmp_path / n}, trainable_blocks: 2}}}}" for n in ("vit_a", "vit_b")
    )
    cli = run_fit(
        "classification/lmsrr_cifar10.yaml",
        tmp_path / "run",
        f"--data.init_args.root={tmp_path / 'data'}",
        "--data.init_args.num_tasks=2",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        f"--model.init_args.backbone_args={{sources: [{sources}]}}",
        "--task_switch.steps_per_task=3",
    )
    (report,) = read_reports(tmp_path / "run")
    assert len(report["matrix"]) == 2
    assert cli.model.switch_logits.shape == (4, 2) and len(cli.model.buffer) > 0
    saved = ViTModel.from_pretrained(tmp_path / "vit_a")
    frozen = cli.model.backbone.sources[0].vit.embeddings.patch_embeddings.projection.weight
    assert torch.equal(frozen, saved.embeddings.patch_embeddings.projection.weight)  # loaded, and never trained
