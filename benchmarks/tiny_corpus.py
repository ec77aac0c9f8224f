"""A tiny, fully generated image + text corpus and the recipe of the 30-step golden training run.

    python benchmarks/tiny_corpus.py OUT_DIR      # writes OUT_DIR/{tokenizer,shards,media,corpus.jsonl}
    python benchmarks/tiny_corpus.py --run OUT_DIR  # + trains the golden recipe on CPU, prints the losses
    OMP_NUM_THREADS=1 python benchmarks/tiny_corpus.py --record   # re-records tests/assets/tiny_train_losses.json

Used by benchmarks/gpu_suite.py (the same 30 steps on CUDA and on CPU, compared with the CPU losses recorded
in tests/assets/tiny_train_losses.json; tests/benchmarks/test_gpu_suite.py runs the suite's `golden` part on
CPU). Everything is generated from numpy and the project's own shard writer, nothing is downloaded or taken
from optional packages, so it runs as is on a GPU machine whose image lacks this project's dev extras.

The tokenizer is a word-level `tokenizers` model written here: the role words, words w0..w{N_WORDS-1},
fillers, and Qwen2-VL's control tokens last, in a 512-token vocabulary; the model is the `tiny` preset with
that vocabulary and those control-token ids (MODEL_OVERRIDES), so a CPU step costs milliseconds, not the
seconds a 151,936-row head would. Images are 56x56 or
56x84 (sides multiples of 28 inside the pixel budget, so smart_resize keeps them and no resampling, whose
rounding could differ between Pillow builds, is involved); each caption's words depend on the image's colour
class, so the loss falls over the run.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_WORDS = 64
VOCAB = 512
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # Qwen2's control tokens, in Qwen2's order
FIRST_SPECIAL = VOCAB - len(SPECIALS)
SPECIAL_IDS = {t: FIRST_SPECIAL + i for i, t in enumerate(SPECIALS)}
MODEL_OVERRIDES = {
    "text.vocab_size": VOCAB, "image_token_id": SPECIAL_IDS["<|image_pad|>"],
    "video_token_id": SPECIAL_IDS["<|video_pad|>"], "vision_start_token_id": SPECIAL_IDS["<|vision_start|>"],
    "vision_end_token_id": SPECIAL_IDS["<|vision_end|>"],
}
"""The tiny preset with this tokenizer's vocabulary and control-token ids."""
COLOURS = [(230, 40, 40), (40, 200, 60), (50, 70, 220), (240, 220, 40), (30, 30, 30), (200, 80, 220)]
GOLDEN_STEPS = 30
GOLDEN_ASSET = ROOT / "tests" / "assets" / "tiny_train_losses.json"
RECORD_COMMAND = "OMP_NUM_THREADS=1 python benchmarks/tiny_corpus.py --record"
TOLERANCE = {
    # CPU vs CPU: re-running with 1 vs 2 threads (another reduction order) moved no loss by more than 6e-8.
    "cpu": {"first_step_rtol": 1e-5, "rtol": 1e-4},
    # CUDA fp32 (TF32 off) vs this CPU record: other kernels (cuBLAS, cuDNN, SDPA) round differently; step 1 is
    # one forward on identical weights and data, later steps let Adam carry rounding along. 1e-3 is 10^4 times
    # the CPU spread and 10x smaller than a typical step-to-step loss change here (~1e-2), so a wrong kernel shows.
    "cuda": {"first_step_rtol": 1e-5, "rtol": 1e-3},
}


def write_tokenizer(out: Path) -> Path:
    """A word-level tokenizer.json: words, fillers, the control tokens last (contiguous ids 0..VOCAB-1)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "system", "user", "assistant", ".", ",", *[f"w{i}" for i in range(N_WORDS)]]
    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"\u2063{i}": i for i in range(len(words), FIRST_SPECIAL)})  # never produced by the text
    vocab.update(SPECIAL_IDS)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _image(rng: np.random.Generator, cls: int, h: int, w: int) -> np.ndarray:
    """A colour-class image: the class colour with a stripe pattern and noise (deterministic per rng)."""
    base = np.array(COLOURS[cls], dtype=np.float32)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    img[:, (np.arange(w) // 7 + cls) % 3 == 0] *= 0.6
    img += rng.normal(0, 12, size=img.shape)
    return img.clip(0, 255).astype(np.uint8)


def _caption(rng: random.Random, cls: int, n: int) -> str:
    # Words w{6c} .. w{6c+5} belong to class c: the text is predictable from the image.
    own = [f"w{6 * cls + k}" for k in range(6)]
    return " ".join(rng.choice(own) if rng.random() < 0.8 else f"w{rng.randrange(N_WORDS)}" for _ in range(n)) + " ."


def make_samples(media: Path, n: int = 160, seed: int = 0) -> list[dict[str, Any]]:
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    media.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        kind = i % 4  # 0, 1: one image + caption; 2: two images; 3: text only
        if kind == 3:
            out.append({"content": _caption(rng, rng.randrange(len(COLOURS)), rng.randrange(8, 30))})
            continue
        items = []
        for j in range(2 if kind == 2 else 1):
            cls = rng.randrange(len(COLOURS))
            h, w = rng.choice([(56, 56), (56, 84), (84, 56)])
            ref = f"img{i:04d}_{j}.png"
            (media / ref).write_bytes(_png(_image(nrng, cls, h, w)))
            caption = _caption(rng, cls, rng.randrange(4, 16))
            items += [{"type": "image", "image": ref}, {"type": "text", "text": caption}]
        out.append({"content": items})
    return out


def make_tiny_corpus(out_dir: str | Path, n: int = 160, seed: int = 0) -> dict[str, Path]:
    """Tokenizer, media, JSONL and shards (through `python -m data.shards make`) under out_dir."""
    from data.shards.__main__ import main as shards_cli

    out = Path(out_dir)
    tok = write_tokenizer(out / "tokenizer")
    samples = make_samples(out / "media", n, seed)
    jsonl = out / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps(s) + "\n" for s in samples))
    argv = ["make", "--input", str(jsonl), "--media", str(out / "media"), "--out", str(out / "shards"),
            "--samples-per-shard", "40", "--tokenizer", str(tok)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = shards_cli(argv)
    if rc != 0:
        raise RuntimeError(f"python -m data.shards {' '.join(argv)} failed ({rc}):\n{buf.getvalue()}")
    return {"tokenizer": tok, "shards": out / "shards"}


def golden_recipe(corpus: dict[str, Path], run_dir: str | Path, device: str, backend: str = "auto") -> dict[str, Any]:
    """The recipe of the golden run: tiny preset, fp32, one process, GOLDEN_STEPS steps of 2 microbatches;
    `backend` is the process group's ('auto': nccl on CUDA, gloo on CPU)."""
    return {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "overrides": dict(MODEL_OVERRIDES)},
        "data": {"datasets": [{"path": str(corpus["shards"]), "kind": "pretrain"}],
                 "tokenizer": str(corpus["tokenizer"]), "max_tokens": 192, "max_pixels": 12544,
                 "num_workers": 1, "shuffle_buffer": 32, "pack_buffer": 16, "seed": 0},
        "parallel": {"mixed_precision": "fp32", "device": device, "timeout_s": 120, "backend": backend},
        "optim": {"lr": 2.0e-3, "weight_decay": 0.01, "warmup_steps": 3, "min_lr_ratio": 0.1, "grad_clip": 1.0},
        "train": {"stage": 2, "steps": GOLDEN_STEPS, "global_microbatches": 2, "seed": 0},
        "checkpoint": {"every": 0, "save_final": False, "resume": "never"},
        "metrics": {"log_every": 1},
    }


def run_golden(corpus: dict[str, Path], run_dir: str | Path, device: str, backend: str = "auto") -> dict[str, Any]:
    """Train the golden recipe in this process (world size 1, through train.trainer.Trainer): the step losses,
    the process-group backend the trainer's path chose, and what its device prefetcher copied."""
    import torch.distributed as dist

    from parallel import destroy_distributed
    from train.config import config_from_dict
    from train.trainer import Trainer

    cfg = config_from_dict(golden_recipe(corpus, run_dir, device, backend))
    trainer = None
    try:
        trainer = Trainer(cfg)
        backend = dist.get_backend()
        result = trainer.train()
        return {"losses": result.losses, "backend": str(backend), "device": str(trainer.device),
                "prefetched_bytes": trainer.prefetcher.copied_bytes,
                "fused_adamw": bool(trainer.optimizer.defaults.get("fused"))}
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed()


def record(path: Path = GOLDEN_ASSET) -> dict[str, Any]:
    """Run the golden recipe on CPU in a temporary folder and write its losses to `path`."""
    import platform
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        losses = run_golden(make_tiny_corpus(Path(tmp) / "corpus"), Path(tmp) / "run", "cpu")["losses"]
    rec = {
        "command": RECORD_COMMAND,
        "recipe": "benchmarks/tiny_corpus.py golden_recipe (tiny preset, 512-token vocabulary, fp32, 2 microbatches "
                  f"of <= 192 tokens per step, {GOLDEN_STEPS} steps, seed 0)",
        "torch": torch.__version__, "machine": platform.machine(), "losses": losses,
        "tolerance": TOLERANCE,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def compare_losses(got: list[float], want: list[float], rtol_first: float, rtol: float) -> tuple[bool, float, str]:
    """(ok, worst relative difference, message): step 1 within rtol_first, every step within rtol."""
    if len(got) != len(want):
        return False, float("inf"), f"{len(got)} losses, the record has {len(want)}"
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got, want)]
    worst = max(rel)
    ok = rel[0] <= rtol_first and worst <= rtol
    return ok, worst, (f"step-1 rel diff {rel[0]:.2e} (<= {rtol_first:g}), worst {worst:.2e} at step "
                       f"{rel.index(worst) + 1} (<= {rtol:g})")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--record"]:
        rec = record()
        print(f"wrote {GOLDEN_ASSET}: {len(rec['losses'])} losses, {rec['losses'][0]:.6f} -> {rec['losses'][-1]:.6f}")
        return 0
    if len(args) == 2 and args[0] == "--run":
        out = Path(args[1])
        print(json.dumps(run_golden(make_tiny_corpus(out / "corpus"), out / "run", "cpu")["losses"]))
        return 0
    if len(args) != 1 or args[0].startswith("-"):
        print(__doc__.split("\n\n")[0])
        return 2
    for k, v in make_tiny_corpus(args[0]).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
