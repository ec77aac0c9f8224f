"""python -m train.demo [--workdir runs/demo] [--steps N]

The README's one command after the install: generate a small real-data sample set (sklearn digits and
scikit-image photos rendered as ChatML and pretraining samples, short PyAV-encoded videos; written as shards by
`python -m data.shards make`), then run the tiny Qwen2-VL through the paper's three stages on CPU, each stage
starting from the previous one's final checkpoint:

    stage 1  recipes/tiny/stage1.yaml   ViT + merger train on image captions, LLM frozen
    stage 2  recipes/tiny/stage2.yaml   everything trains on captions, interleaved text, video, plain text
    stage 3  recipes/tiny/stage3.yaml   ViT frozen, ChatML instruction tuning

and export the result as a Hugging Face directory. It prints where the checkpoints and metrics are. No network.
The same stages run by hand (after the data exists):

    DEMO_DIR=runs/demo python -m train recipes/tiny/stage1.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "tiny"


def _losses(metrics: Path) -> list[float]:
    out = []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out.append(rec["loss"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/demo",
                    help="where data/, the stage runs stage1..3/ and hf/ go (default ./runs/demo)")
    ap.add_argument("--steps", type=int, default=None, help="steps per stage (default: the recipes' 20)")
    ap.add_argument("--digits", type=int, default=240, help="digit images in the sample set")
    ap.add_argument("--reuse-data", action="store_true", help="keep an existing WORKDIR/data")
    args = ap.parse_args(argv)
    if not RECIPES.is_dir():
        print(f"recipes not found at {RECIPES}: run from a source checkout (pip install -e .)", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir).resolve()
    os.environ["DEMO_DIR"] = str(work)
    t_start = time.perf_counter()

    from train.demo_data import make_demo_data

    data = work / "data"
    if args.reuse_data and (data / "stage3" / "dataset.json").is_file():
        print(f"[demo] reusing the sample set in {data}")
    else:
        print(f"[demo] generating the sample set in {data} (digits, photos, videos -> python -m data.shards make)")
        t0 = time.perf_counter()
        make_demo_data(data, n_digits=args.digits)
        print(f"[demo] sample set ready in {time.perf_counter() - t0:.0f}s")
    # Fresh runs: a leftover run dir would be resumed (checkpoint.resume: auto) instead of trained.
    for old in ("stage1", "stage2", "stage3", "hf"):
        shutil.rmtree(work / old, ignore_errors=True)

    from train.config import load_config
    from train.export import export
    from train.trainer import run

    results = []
    for stage in (1, 2, 3):
        overrides = [f"train.steps={args.steps}"] if args.steps else []
        if args.steps:
            overrides += [f"checkpoint.every={max(1, args.steps // 2)}", f"optim.warmup_steps={min(3, args.steps)}"]
        recipe = RECIPES / f"stage{stage}.yaml"
        cfg = load_config(recipe, overrides)
        cmd = f"DEMO_DIR={work} python -m train {recipe.relative_to(RECIPES.parent.parent)} {' '.join(overrides)}"
        print(f"\n[demo] stage {stage}: {cmd.rstrip()}  (frozen: {', '.join(cfg.frozen_groups) or 'nothing'})")
        t0 = time.perf_counter()
        res = run(cfg)
        results.append((stage, cfg, res, time.perf_counter() - t0))
    hf = work / "hf"
    export(results[-1][2].checkpoint, hf, dtype="fp32")

    print(f"\n[demo] done in {time.perf_counter() - t_start:.0f}s")
    print(f"{'stage':<6} {'steps':>5} {'loss first -> last':>22} {'time':>6}  checkpoint / metrics")
    for stage, cfg, res, dt in results:
        losses = _losses(Path(cfg.run_dir) / "metrics.jsonl")
        print(f"{stage:<6} {res.final_step:>5} {losses[0]:>10.4f} -> {losses[-1]:<9.4f} {dt:>5.0f}s  {res.checkpoint}")
        print(f"{'':<44}  {Path(cfg.run_dir) / 'metrics.jsonl'}")
    print(f"Hugging Face export of stage 3: {hf}  (transformers loads it; check: python -m model.parity --hf {hf})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
