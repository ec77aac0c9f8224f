"""benchmarks/memory_check.py on the tiny model: the dry run's parameter, gradient and optimizer-state memory equal
what a measured CPU training step holds (within the issue's 15%), and its total bounds the step's peak from above.
The 2B-width figures (docs/perf/README.md) come from the same code: `python benchmarks/memory_check.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.timeout(600)
def test_the_dry_runs_state_memory_matches_a_measured_step_and_its_total_bounds_the_peak():
    import memory_check as M

    results = M.run_cases(["fp32/none", "bf16/full"], tokens=256, threads=1, preset="tiny", timeout=500)
    for r in results:
        q = M.ratios(r)
        for part in ("params", "grads", "optimizer"):
            assert 0.85 <= q[part] <= 1.15, (r["case"], part, M.table([r]))
        assert q["total/tracked"] >= 1.0, M.table([r])  # a planner's estimate: never below the allocated peak
        assert r["measured_gb"]["total_rss"] > 0 and r["peak_phase"] in ("backward", "grad reduction")
    assert results[1]["measured_gb"]["activations_saved"] < results[0]["measured_gb"]["activations_saved"], (
        "full checkpointing keeps less than no checkpointing")
