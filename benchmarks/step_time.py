"""python benchmarks/step_time.py [--model tiny|2b-slice] [--steps 4] [--vs-tree DIR] [--rounds 2] [--json OUT]

CPU time of one training step (Trainer.train_step, one process, fp32) of the golden tiny recipe
(benchmarks/tiny_corpus.py: generated corpus, 2 microbatches of 192 tokens) or of a 2B-width slice (Qwen2-VL-2B's
ViT and decoder widths, 2 ViT blocks, 2 decoder layers, the same corpus at 512-token microbatches). The median of
`--steps` steps after one warm-up step, each step ending with a read of its loss (so queued work is counted).

--vs-tree DIR times the same thing with another checkout's code (e.g. a worktree of the commit before a change),
alternating A B A B over `--rounds` fresh processes each, and prints the ratio this tree / that tree: both
figures come from the same run on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TREE = Path(os.environ.get("STEP_TIME_TREE") or Path(__file__).resolve().parents[1])
for _p in (str(TREE), str(TREE / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SLICE = {"text.num_layers": 2, "vision.depth": 2}
"""Overrides of the 2b preset: two blocks of each kind, with the corpus's small vocabulary and control-token ids
(tiny_corpus.MODEL_OVERRIDES), as the golden recipe has them."""


def _recipe(model: str, tmp: Path) -> dict:
    from tiny_corpus import golden_recipe, make_tiny_corpus

    raw = golden_recipe(make_tiny_corpus(tmp / "corpus"), tmp / "run", "cpu")
    raw["data"]["num_workers"] = 0
    if model == "2b-slice":
        raw["model"] = {"preset": "2b", "overrides": {**raw["model"]["overrides"], **SLICE}}
        raw["data"]["max_tokens"] = 512
    return raw


def measure(model: str, steps: int) -> dict:
    """Seconds per step (median of `steps`, after one warm-up step) in this process, with TREE's code."""
    import torch

    from parallel import destroy_distributed
    from train.config import config_from_dict
    from train.trainer import Trainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config_from_dict(_recipe(model, Path(tmp))))
        times = []
        try:
            for i in range(steps + 1):
                t0 = time.perf_counter()
                st = trainer.train_step()
                float(getattr(st, "loss_t", None) if hasattr(st, "loss_t") else st.loss)  # the step's work done
                if i:
                    times.append(time.perf_counter() - t0)
        finally:
            trainer.close()
            destroy_distributed()
    return {"model": model, "tree": str(TREE), "step_s": statistics.median(times), "steps": times}


def _child(tree: Path, model: str, steps: int) -> dict:
    env = {**os.environ, "STEP_TIME_TREE": str(tree), "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--model", model, "--steps", str(steps), "--child"],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "2b-slice"), default="tiny")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--vs-tree", type=Path, default=None, help="another checkout to compare with (the baseline)")
    ap.add_argument("--rounds", type=int, default=2, help="with --vs-tree: processes per tree, alternating")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child or a.vs_tree is None:
        res = measure(a.model, a.steps)
        print(json.dumps(res) if a.child else f"{a.model}: {res['step_s'] * 1e3:.1f} ms/step (median of {a.steps})")
        return 0
    here, there = [], []
    for _ in range(a.rounds):
        here.append(_child(TREE, a.model, a.steps)["step_s"])
        there.append(_child(a.vs_tree.resolve(), a.model, a.steps)["step_s"])
    h, t = statistics.median(here), statistics.median(there)
    print(f"{a.model}: this tree {h * 1e3:.1f} ms/step, {a.vs_tree} {t * 1e3:.1f} ms/step, ratio {h / t:.3f} "
          f"(medians of {a.rounds} processes x {a.steps} steps, alternating)")
    if a.json:
        a.json.write_text(json.dumps({"model": a.model, "this": here, "baseline": there, "ratio": h / t}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
