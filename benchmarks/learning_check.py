"""python benchmarks/learning_check.py [--family F] [--workdir runs/learn] [--variants full,no_stage1,no_stage2]
                                     [--threads N]

The learning check (docs/learning.md): the three-stage chain of recipes/learn/ on the project's real-data set
(demo/data.py: sklearn digits, videos of a digit moving left/right/up/down), scored by greedy generation
on held-out data that no stage ever trains on: digits with index >= 1500 ("Which digit is this?", 10 classes)
and videos of those digits ("Which way does the digit move?", 4 directions, drawn independently of the training
videos'). Goal: >= 90% exact match on the digits and >= 80% on the videos after the three stages, in <= 15
minutes on 2 CPU cores.

Variants, each with the same total step budget (the dropped stage's steps go to the stage after it):

    full        stage 1 -> stage 2 -> stage 3            the recipes' steps
    no_stage1   stage 2 (+ stage 1's steps) -> stage 3   from a random init
    no_stage2   stage 1 -> stage 3 (+ stage 2's steps)   the ViT then never sees a video before it is frozen
    stage3_only stage 3 with all the steps               (optional)
    lora3       stage 1 -> stage 2 -> stage 3 with LoRA      the recipes' steps; stage 3 trains LoRA adapters on the
                                                          LLM (LORA3) and the merger in full (optional)

--family picks the tiny preset of qwen2_vl (default), qwen2_5_vl or qwen3_vl (model.family on every stage).

It prints the accuracy table (exact match and "contains", per variant and stage) with the command of every
stage, writes WORKDIR/results.json, and the report of the full chain (python -m tools.report) to
WORKDIR/full/report. Data: WORKDIR/data (generated unless --reuse-data). Timings depend on the machine's load:
the table gives wall and CPU seconds of each stage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from demo.chain import HELDOUT, RECIPES, StageRun, accuracy, prepare_data, run_chain  # noqa: E402
from model.family import DEFAULT_FAMILY, FAMILY_NAMES  # noqa: E402
from train.config import load_config  # noqa: E402
from train.formatting import pct  # noqa: E402

GOALS = {"digits": 0.90, "videos": 0.80}
"""Exact-match goals after the three stages."""
LORA3 = ["lora.rank=16", "lora.alpha=32", "lora.fully_trainable=[merger]", "optim.lr=1.0e-2"]
"""The lora3 variant's stage-3 overrides: adapters on every LLM projection (the section's default targets)."""


def recipe_steps() -> dict[int, int]:
    os.environ.setdefault("LEARN_DIR", "runs/learn")
    return {s: load_config(RECIPES / f"stage{s}.yaml").train.steps for s in (1, 2, 3)}


def variant_steps(name: str, steps: dict[int, int]) -> dict[int, int]:
    """The stages of a variant and their steps (the same total as the full chain)."""
    s1, s2, s3 = steps[1], steps[2], steps[3]
    table = {"full": {1: s1, 2: s2, 3: s3}, "no_stage1": {2: s1 + s2, 3: s3}, "no_stage2": {1: s1, 3: s2 + s3},
             "stage3_only": {3: s1 + s2 + s3}, "lora3": {1: s1, 2: s2, 3: s3}}
    if name not in table:
        raise SystemExit(f"unknown variant {name!r}: choose from {', '.join(table)}")
    return table[name]


def table(results: dict[str, list[StageRun]]) -> str:
    head = (f"| variant | stage | steps | {' | '.join(f'{d} exact | {d} contains' for d in HELDOUT)} | "
            "wall | CPU |")
    lines = [head, "|" + "---|" * (5 + 2 * len(HELDOUT))]
    for name, runs in results.items():
        for r in runs:
            acc = " | ".join(f"{pct(accuracy(r, d))} | {pct(accuracy(r, d, 'contains'))}" for d in HELDOUT)
            lines.append(f"| {name} | {r.stage} | {r.steps} | {acc} | {r.seconds:.0f}s | {r.cpu_seconds:.0f}s |")
        total = sum(r.seconds for r in runs)
        lines.append(f"| {name} | total | {sum(r.steps for r in runs)} | "
                     + " | ".join(f"**{pct(accuracy(runs[-1], d))}** | {pct(accuracy(runs[-1], d, 'contains'))}"
                                  for d in HELDOUT)
                     + f" | **{total:.0f}s** | {sum(r.cpu_seconds for r in runs):.0f}s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default=DEFAULT_FAMILY, choices=FAMILY_NAMES,
                    help=f"the family whose tiny preset trains (default {DEFAULT_FAMILY})")
    ap.add_argument("--workdir", default="runs/learn", help="data/ and one directory per variant (default runs/learn)")
    ap.add_argument("--variants", default="full,no_stage1,no_stage2",
                    help="comma-separated: full, no_stage1, no_stage2, stage3_only, lora3 (default the first three)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default OMP_NUM_THREADS, else 2; on a shared machine 1 can be faster)")
    ap.add_argument("--seed", type=int, default=0, help="train.seed and data.seed of every stage")
    ap.add_argument("--reuse-data", action="store_true", help="keep an existing WORKDIR/data")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    import torch

    torch.set_num_threads(args.threads or int(os.environ["OMP_NUM_THREADS"]))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(args.workdir).resolve()
    os.environ["LEARN_DIR"] = str(work)
    steps = recipe_steps()
    prepare_data(work / "data", args.reuse_data)
    results: dict[str, list[StageRun]] = {}
    load = os.getloadavg()
    for name in args.variants.split(","):
        vdir = work / name
        if vdir.exists():
            import shutil

            shutil.rmtree(vdir)  # a leftover run would be resumed instead of trained
        extra = [f"model.family={args.family}", f"train.seed={args.seed}", f"data.seed={args.seed}"]
        results[name] = run_chain(work, variant_steps(name, steps), extra, runs=vdir,
                                  stage_extra={3: LORA3} if name == "lora3" else None)
        if name == "full":
            from tools.report import write_report

            index = write_report([r.run_dir for r in results[name]], vdir / "report",
                                 title="Learning check: stage 1 -> 2 -> 3")
            print(f"[check] report of the full chain: {index}")
    load_end = os.getloadavg()
    print(f"\nLearning check, {args.family} (threads {torch.get_num_threads()}, load average {load[0]:.1f} at the "
          f"start, {load_end[0]:.1f} at the end; held-out: 297 digits, 100 videos; chance 10% / 25%):\n")
    print(table(results))
    print("\nCommands (LEARN_DIR holds data/; each stage starts from the previous one's run dir):")
    for name, runs in results.items():
        print(f"  {name}:")
        for r in runs:
            print(f"    {r.command}")
    full = results.get("full")
    if full:
        met = {d: (accuracy(full[-1], d) or 0.0) >= g for d, g in GOALS.items()}
        total = sum(r.seconds for r in full)
        print("\nGoals after the full chain: " + ", ".join(
            f"{d} {pct(accuracy(full[-1], d))} (>= {100 * g:.0f}%: {'met' if met[d] else 'NOT met'})"
            for d, g in GOALS.items()) + f"; wall {total:.0f}s (<= 900s: {'met' if total <= 900 else 'NOT met'})")
    out = {name: [{"stage": r.stage, "steps": r.steps, "command": r.command, "seconds": round(r.seconds, 1),
                   "cpu_seconds": round(r.cpu_seconds, 1), "evals": r.evals} for r in runs]
           for name, runs in results.items()}
    out["_meta"] = {"family": args.family, "threads": torch.get_num_threads(), "load_start": load,
                    "load_end": load_end}
    (work / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
