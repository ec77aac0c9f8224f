"""python -m train.demo [--workdir runs/demo] [--steps S1,S2,S3] [--threads N] [--eval-samples N]

The README's one command after the install: generate the project's real-data sample set (sklearn digits,
scikit-image photos, PyAV-encoded videos of a digit moving; train/demo_data.py, written as shards by
`python -m data.shards make`), then train the tiny Qwen2-VL through the paper's three stages on CPU, each stage
starting from the previous one's final checkpoint and ending with a held-out evaluation (greedy answers to
"Which digit is this?" on digits never trained on, and "Which way does the digit move?" on unseen videos):

    stage 1  recipes/learn/stage1.yaml   ViT + merger train on digit captions, LLM frozen
    stage 2  recipes/learn/stage2.yaml   everything trains on captions, two-digit text, video captions, text
    stage 3  recipes/learn/stage3.yaml   ViT frozen, ChatML questions

with the short schedule DEMO_STEPS (the learning check, benchmarks/learning_check.py, runs the recipes' full
one). It prints the held-out accuracy after each stage, exports stage 3 as a Hugging Face directory and writes
the report (python -m train.report) of the chain, whose path it prints. No network. The same stages by hand:

    python -m train.demo_data runs/demo/data
    LEARN_DIR=runs/demo python -m train recipes/learn/stage1.yaml train.steps=60
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.report import pct

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
              recipes: Path = RECIPES, print_fn=print) -> list[StageRun]:
    """Train the stages in `steps` ({stage: steps}, in order; a stage not in it is skipped, the next one then
    starts from the last stage that ran, or from a random init) under LEARN_DIR=work (its data/), each in
    RUNS/stageN (default RUNS = work)."""
    from train.config import load_config
    from train.report import load_run
    from train.trainer import run

    os.environ["LEARN_DIR"] = str(work)
    runs = work if runs is None else runs
    out: list[StageRun] = []
    prev: Path | None = None
    for stage, n in steps.items():
        run_dir = runs / f"stage{stage}"
        overrides = [f"train.steps={n}", f"optim.warmup_steps={min(10, max(1, n // 10))}",
                     f"model.init_from={prev if prev is not None else 'null'}", *(extra or [])]
        if runs != work:
            overrides.insert(0, f"run_dir={run_dir}")
        recipe = recipes / f"stage{stage}.yaml"
        cfg = load_config(recipe, overrides)
        cmd = f"LEARN_DIR={work} python -m train {recipe.relative_to(REPO)} {' '.join(overrides)}"
        print_fn(f"\n[chain] stage {stage}: {cmd}  (frozen: {', '.join(cfg.frozen_groups) or 'nothing'})")
        t0, c0 = time.perf_counter(), time.process_time()
        res = run(cfg)
        rec = load_run(run_dir)
        losses = [rec.steps[s]["loss"] for s in sorted(rec.steps)]
        out.append(StageRun(stage, res.final_step, cmd, run_dir, time.perf_counter() - t0, time.process_time() - c0,
                            losses, rec.final_evals(), res.checkpoint))
        prev = run_dir
    return out


def prepare_data(data: Path, reuse: bool, n_digits: int | None = None, print_fn=print) -> Path:
    """Generate the sample set in `data` (train/demo_data.py), or keep a complete earlier one when `reuse`."""
    from train.demo_data import HELDOUT_FROM, make_demo_data

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


def parse_steps(text: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: give three positive step counts, e.g. 60,80,120")
    return vals  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo",
                    help="where data/, the stage runs stage1..3/, hf/ and report/ go (default ./runs/demo)")
    ap.add_argument("--steps", type=parse_steps, default=DEMO_STEPS,
                    help=f"steps of stages 1,2,3 (default {','.join(map(str, DEMO_STEPS))})")
    ap.add_argument("--digits", type=int, default=1500, help="training digits (indices 0..N-1 of 1,797; <= 1500)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: OMP_NUM_THREADS, else 2); on a machine shared with other "
                         "jobs 1 is often faster than 2")
    ap.add_argument("--eval-samples", type=int, default=None,
                    help="answer only the first N questions of each held-out set (default: all 297 / 100)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed and data.seed of every stage")
    ap.add_argument("--reuse-data", action="store_true", help="keep an existing WORKDIR/data")
    ap.add_argument("--keep-runs", action="store_true",
                    help="keep existing stage runs in WORKDIR (they then resume instead of training anew)")
    ap.add_argument("--no-export", action="store_true", help="skip the Hugging Face export of stage 3")
    args = ap.parse_args(argv)
    if not RECIPES.is_dir():
        print(f"recipes not found at {RECIPES}: run from a source checkout (pip install -e .)", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads or int(os.environ["OMP_NUM_THREADS"]))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir).resolve()
    t_start = time.perf_counter()

    data = prepare_data(work / "data", args.reuse_data, n_digits=args.digits)
    # Fresh runs: a leftover run dir would be resumed (checkpoint.resume: auto) instead of trained.
    old = [d for d in ("stage1", "stage2", "stage3", "hf", "report") if (work / d).exists()]
    if old and not args.keep_runs:
        print(f"[demo] replacing the earlier demo runs in {work}: {', '.join(old)} (--keep-runs keeps them)")
        for d in old:
            shutil.rmtree(work / d, ignore_errors=True)

    # One evaluation at the end of each stage: the figures the demo prints.
    extra = [f"train.seed={args.seed}", f"data.seed={args.seed}", "eval.every=0"]
    if args.eval_samples:
        extra.append(f"eval.max_samples={args.eval_samples}")
    runs = run_chain(work, dict(zip((1, 2, 3), args.steps)), extra)
    from train.report import write_report

    index = write_report([r.run_dir for r in runs], work / "report", title="Demo: stage 1 -> 2 -> 3 (held-out eval)")
    print(f"\n[demo] done in {time.perf_counter() - t_start:.0f}s; held-out accuracy after each stage (greedy answers "
          "on digits 1500..1796 and unseen videos; chance: 10% digits, 25% directions):")
    print(stage_table(runs))
    for r in runs:
        print(f"  stage {r.stage}: {r.checkpoint}  metrics: {r.run_dir / 'metrics.jsonl'}")
    if not args.no_export:
        from train.export import export

        hf = work / "hf"
        export(runs[-1].checkpoint, hf, dtype="fp32")
        print(f"Hugging Face export of stage 3: {hf}  (check: python -m model.parity --hf {hf})")
    print(f"Report (plots + index): {index}")
    print(f"Offline eval: python -m train.eval {runs[-1].run_dir} --data {data / 'heldout_digits'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
