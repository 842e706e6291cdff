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
    assert result["tiny"] and set(rows) == {"lmsrr", "r2moe", "dmpel", "zero2", "rid", "rorem"}
    for key in ("lmsrr", "r2moe", "dmpel"):
        row = rows[key]
        assert row["status"] == "ok", f"{key}: {row.get('error')}"
        assert row["loss_finite"] and all(math.isfinite(v) for v in row["losses"]), row
        assert len(row["losses"]) == result["steps"] + 1
        assert row["step_s"] > 0 and row["samples_per_s"] > 0 and row["peak_memory_gib"] > 0, row
    assert rows["rid"]["status"] == rows["rorem"]["status"] == "not present"
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
