"""experiments/gpu_experiments.py, prepared for the GPU sessions, runs end to end (on the CPU where there is no GPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "gpu_experiments.py"


def test_gpu_experiments_script_runs(tiny_llama):
    options = ["--device=cpu", "--dtype=float32", "--tokens=2", "--contexts=8,20"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tiny_llama), *options],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "baseline" in done.stdout and "fused_residual" in done.stdout and "failed" not in done.stdout
    assert "after    20 tokens" in done.stdout
