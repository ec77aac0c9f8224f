"""The GPU throughput benchmark runs end to end: its CPU smoke mode on CI, the real thing where a GPU is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_gpu_throughput.py"


@pytest.mark.timeout(200)
def test_gpu_throughput_benchmark_cpu_smoke():
    out = subprocess.run([sys.executable, str(SCRIPT), "--cpu"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert "device: cpu" in out.stdout and "tokens/s" in out.stdout and "tiny:" in out.stdout


@pytest.mark.gpu
@pytest.mark.timeout(300)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_throughput_benchmark_on_gpu():
    out = subprocess.run([sys.executable, str(SCRIPT), "--configs", "tiny", "--steps", "3", "--time-limit", "120"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert "MFU" in out.stdout
