"""python -m demo [--family qwen2_vl|qwen2_5_vl|qwen3_vl] [--workdir runs/demo] [--steps S1,S2,S3] [--threads N]

The README's one command after the install: generate the project's real-data sample set (sklearn digits,
scikit-image photos, PyAV-encoded videos of a digit moving; demo/data.py, written as shards by
`python -m data.shards make`), then train the tiny model of a family (--family; default Qwen2-VL) through the
paper's three stages on CPU, each stage
starting from the previous one's final checkpoint and ending with a held-out evaluation (greedy answers to
"Which digit is this?" on digits never trained on, and "Which way does the digit move?" on unseen videos):

    stage 1  recipes/learn/stage1.yaml   ViT + merger train on digit captions, LLM frozen
    stage 2  recipes/learn/stage2.yaml   everything trains on captions, two-digit text, video captions, text
    stage 3  recipes/learn/stage3.yaml   ViT frozen, ChatML questions

with the short schedule DEMO_STEPS (the learning check, benchmarks/learning_check.py, runs the recipes' full
one). It prints the held-out accuracy after each stage, exports stage 3 as a Hugging Face directory, writes
the report (python -m tools.report) of the chain, whose path it prints, and ends by asking the exported model about
a held-out digit with python -m tools.chat. No network. The same stages by hand (docs/train.md):

    python -m demo.data runs/hand/data
    LEARN_DIR=runs/hand python -m train recipes/learn/stage1.yaml train.steps=10     # -> runs/hand/stage1
    LEARN_DIR=runs/hand python -m train recipes/learn/stage2.yaml train.steps=150    # from runs/hand/stage1
    LEARN_DIR=runs/hand python -m train recipes/learn/stage3.yaml train.steps=200    # from runs/hand/stage2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from demo.chain import DEMO_STEPS, RECIPES, prepare_data, run_chain, stage_table
from model.family import DEFAULT_FAMILY, FAMILY_NAMES


def parse_steps(text: str) -> tuple[int, int, int]:
    try:
        vals = tuple(int(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"--steps {text!r}: give three positive step counts, e.g. 60,80,120")
    return vals  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0])
    ap.add_argument("--family", default=DEFAULT_FAMILY, choices=FAMILY_NAMES,
                    help=f"the model family whose tiny preset trains (default {DEFAULT_FAMILY})")
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
    extra = [f"model.family={args.family}", f"train.seed={args.seed}", f"data.seed={args.seed}", "eval.every=0"]
    if args.eval_samples:
        extra.append(f"eval.max_samples={args.eval_samples}")
    runs = run_chain(work, dict(zip((1, 2, 3), args.steps)), extra)
    from tools.report import write_report

    index = write_report([r.run_dir for r in runs], work / "report", title="Demo: stage 1 -> 2 -> 3 (held-out eval)")
    print(f"\n[demo] done in {time.perf_counter() - t_start:.0f}s; held-out accuracy after each stage (greedy answers "
          "on digits 1500..1796 and unseen videos; chance: 10% digits, 25% directions):")
    print(stage_table(runs))
    for r in runs:
        print(f"  stage {r.stage}: {r.checkpoint}  metrics: {r.run_dir / 'metrics.jsonl'}")
    if not args.no_export:
        from tools.export import export

        hf = work / "hf"
        export(runs[-1].checkpoint, hf, dtype="fp32")
        print(f"Hugging Face export of stage 3 (fp32 weights): {hf}  (check: python -m model.parity --hf {hf})")
    print(f"Report (plots + index): {index}")
    print(f"Offline eval: python -m tools.eval {runs[-1].run_dir} --data {data / 'heldout_digits'}")
    show_chat(runs[-1].run_dir if args.no_export else work / "hf", data)
    return 0


def show_chat(model: Path, data: Path) -> None:
    """Ask the trained model about the first held-out digit with python -m tools.chat, as a user would."""
    from tools.chat import main as chat

    first = json.loads((data / "heldout_digits.jsonl").read_text().splitlines()[0])["messages"]
    items = {it["type"]: it for it in first[0]["content"]}
    image, question, truth = data / "media" / items["image"]["image"], items["text"]["text"], first[1]["content"]
    print(f"Ask it: python -m tools.chat {model} --image {image} {shlex.quote(question)}")
    print(f"  {question} ", end="", flush=True)
    chat([str(model), "--image", str(image), question, "--max-new-tokens", "8", "--device", "cpu"])
    print(f"  (the answer is {truth}: a digit never trained on)")


if __name__ == "__main__":
    sys.exit(main())
