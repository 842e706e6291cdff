"""benchmarks/gpu_check.py: the `--tiny` form trains every present family on a CPU and writes its JSON, and
the `lifelong fit` path of its DeepSpeed row works with the CPU trainer config (ZeRO-2 itself needs a GPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_tiny_check_trains_every_present_family(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {row["key"]: row for row in result["rows"]}
    present = ("lmsrr", "r2moe", "rid", "rorem", "discriminator", "dmpel")
    assert result["tiny"] and set(rows) == {*present, "zero2"}
    for key in present:
        row = rows[key]
        assert row["status"] == "ok", f"{key}: {row.get('error')}"
        assert row["loss_finite"] and all(math.isfinite(v) for v in row["losses"]), row
        assert len(row["losses"]) == result["steps"] + 1
        assert row["step_s"] > 0 and row["samples_per_s"] > 0 and row["peak_memory_gib"] > 0, row
    if not torch.cuda.is_available():
        assert rows["zero2"]["status"] == "skipped" and "CUDA" in rows["zero2"]["error"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "GPU readiness check" in proc.stdout


def test_fit_row_runs_lifelong_fit(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclasses look their module up
    spec.loader.exec_module(gpu_check)
    run = gpu_check.Run(torch.device("cpu"), None, steps=2, tiny=True, tmp=str(tmp_path))
    row = gpu_check.fit_row("configs/trainer/cpu.yaml", run)
    assert len(row["losses"]) == 3 and row["loss_finite"] and row["step_s"] > 0
    assert row["strategy"] == "SingleDeviceStrategy"


def test_sdxl_inpainting_shapes_match_the_published_model(monkeypatch):
    """Built on the meta device (no memory): SDXL's UNet has 2,567,463,684 parameters, and the inpainting
    UNet's first convolution takes 9 channels instead of 4 (5 x 320 x 3 x 3 = 14,400 more); the text encoders
    are CLIP-L's (123,060,480) and OpenCLIP bigG's with its projection (694,659,840). A 512x512 batch's
    latents go through with the encoders' 2048-wide context and 1280-wide pooled embedding."""
    import lightning_modules.nn.diffusion.inpainting as inpainting

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)
    spec.loader.exec_module(gpu_check)
    tiny = inpainting.tiny_inpainting(0)  # its scheduler and tokenizers, made on the CPU
    monkeypatch.setattr(inpainting, "tiny_inpainting", lambda seed=0: tiny)
    with torch.device("meta"):
        parts = gpu_check.sdxl_inpainting_parts("unused")
        counts = {
            n: sum(p.numel() for p in getattr(parts, n).parameters())
            for n in ("unet", "text_encoder", "text_encoder_2")
        }
        assert counts == {"unet": 2_567_463_684 + 14_400, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
        out = parts.predict(
            torch.zeros(2, 9, 64, 64), torch.tensor([10, 10]), torch.zeros(2, 77, 2048), torch.zeros(2, 1280), 512
        )
    assert out.shape == (2, 4, 64, 64)
