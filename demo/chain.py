"""The demo's stage chain: train stage 1 -> 2 -> 3 of recipes/learn, each from the previous one's final checkpoint,
on the real-data sample set (demo/data.py), and tabulate each stage's held-out accuracy. `python -m demo` runs it
(demo/__main__.py); the learning check (benchmarks/learning_check.py) runs the same chain with the recipes' full
schedule.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.formatting import pct

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes" / "learn"
DEMO_STEPS = (10, 150, 200)
"""Steps of stages 1, 2, 3 in the demo (and the CI learning test): about 5 minutes on 2 cores. Stage 2 gets
the most: with the ViT frozen in stage 3, what stage 2 teaches it is all stage 3 can read."""
HELDOUT = ("digits", "videos")
"""The eval datasets with generation figures (recipes/learn/base.yaml's eval section)."""


@dataclass
class StageRun:
    """One stage of a chain as it ran."""

    stage: int
    steps: int
    command: str
    run_dir: Path
    seconds: float
    cpu_seconds: float
    losses: list[float]
    evals: dict[str, dict[str, Any]]
    """dataset -> the eval record at the end of the stage."""
    checkpoint: Path | None


def run_chain(work: Path, steps: dict[int, int], extra: list[str] | None = None, runs: Path | None = None,
              recipes: Path = RECIPES, print_fn=print, stage_extra: dict[int, list[str]] | None = None,
              ) -> list[StageRun]:
    """Train the stages in `steps` ({stage: steps}, in order; a stage not in it is skipped, the next one then
    starts from the last stage that ran, or from a random init) under LEARN_DIR=work (its data/), each in
    RUNS/stageN (default RUNS = work). `extra`: overrides of every stage (e.g. model.family=qwen3_vl);
    `stage_extra`: of one stage (e.g. {3: [lora.rank=8, ...]})."""
    from tools.report import load_run
    from train.config import load_config
    from train.trainer import run

    os.environ["LEARN_DIR"] = str(work)
    runs = work if runs is None else runs
    out: list[StageRun] = []
    prev: Path | None = None
    for stage, n in steps.items():
        run_dir = runs / f"stage{stage}"
        overrides = [f"train.steps={n}", f"optim.warmup_steps={min(10, max(1, n // 10))}",
                     f"model.init_from={prev if prev is not None else 'null'}", *(extra or []),
                     *(stage_extra or {}).get(stage, [])]
        if runs != work:
            overrides.insert(0, f"run_dir={run_dir}")
        recipe = recipes / f"stage{stage}.yaml"
        cfg = load_config(recipe, overrides)
        cmd = f"LEARN_DIR={work} python -m train {recipe.relative_to(REPO)} {' '.join(overrides)}"
        print_fn(f"\n[chain] stage {stage}: {cmd}  (frozen: {', '.join(cfg.frozen_groups) or 'nothing'})")
        t0, c0 = time.perf_counter(), time.process_time()
        res = run(cfg)
        if res.stop_signal is not None:  # Ctrl-C / SIGTERM: the stage saved a checkpoint; the next must not start
            print_fn(f"[chain] stage {stage} stopped by a signal at step {res.final_step} (its checkpoint is saved: "
                     f"the same command resumes it); the chain stops here")
            raise SystemExit(128 + int(res.stop_signal))
        rec = load_run(run_dir)
        losses = [rec.steps[s]["loss"] for s in sorted(rec.steps)]
        out.append(StageRun(stage, res.final_step, cmd, run_dir, time.perf_counter() - t0, time.process_time() - c0,
                            losses, rec.final_evals(), res.checkpoint))
        prev = run_dir
    return out


def prepare_data(data: Path, reuse: bool, n_digits: int | None = None, print_fn=print) -> Path:
    """Generate the sample set in `data` (demo/data.py), or keep a complete earlier one when `reuse`."""
    from demo.data import HELDOUT_FROM, make_demo_data

    # heldout_captions is the last dataset make_demo_data writes: a generation cut short is never reused.
    if reuse and (data / "heldout_captions" / "dataset.json").is_file():
        print_fn(f"[data] reusing the sample set in {data}")
        return data
    print_fn(f"[data] generating the sample set in {data} (digits, photos, videos -> python -m data.shards make)")
    t0 = time.perf_counter()
    make_demo_data(data, n_digits=HELDOUT_FROM if n_digits is None else n_digits)
    print_fn(f"[data] sample set ready in {time.perf_counter() - t0:.0f}s")
    return data


def accuracy(r: StageRun, dataset: str, key: str = "exact") -> float | None:
    v = r.evals.get(dataset, {}).get(key)
    return float(v) if isinstance(v, (int, float)) else None


def stage_table(runs: list[StageRun]) -> str:
    """Per stage: steps, training loss first -> last, held-out exact match (contains), time."""
    head = f"{'stage':<6} {'steps':>5} {'loss first -> last':>20}  " + "  ".join(
        f"{d + ' exact (contains)':>24}" for d in HELDOUT) + f"  {'time':>6}"
    lines = [head]
    for r in runs:
        loss = f"{r.losses[0]:.3f} -> {r.losses[-1]:.3f}" if r.losses else "n/a"
        acc = "  ".join(f"{pct(accuracy(r, d)) + ' (' + pct(accuracy(r, d, 'contains')) + ')':>24}" for d in HELDOUT)
        lines.append(f"{r.stage:<6} {r.steps:>5} {loss:>20}  {acc}  {r.seconds:>5.0f}s")
    return "\n".join(lines)
