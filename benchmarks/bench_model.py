"""python benchmarks/bench_model.py [--reps 3] [--threads N]

One forward + backward on the SAME samples: ours (packed into one sequence with cu_seqlens, loss head on
supervised positions only, chunked) versus transformers' Qwen2VLForConditionalGeneration on the usual padded
batch (attention_mask, labels with -100, its default SDPA attention, full logits). Same weights (ours is
loaded from the transformers model through the project's HF adapter), same position ids, one process on
CPU. Target: ours >= 2x faster on a batch of mixed lengths.

Each side runs in its own fresh subprocess, one after the other, so neither sees the other's allocations:
  time: median of --reps timed steps after one warm-up step, wall clock and process CPU time (the latter
  less sensitive to other processes sharing the cores);
  peak memory: the process's peak RSS during its FIRST step minus its RSS right before it (the kernel's
  high-water mark VmHWM, reset through /proc/self/clear_refs), i.e. everything the step allocated beyond
  the weights and inputs: activations, logits, gradients.

Config: a tiny-but-not-trivial Qwen2-VL (ViT 4 x 128, LLM 4 x 256 with GQA 8/2, the real 151,936 vocab),
8 samples of 60..520 tokens, 5 with images of different sizes, about 40 % of the text tokens supervised (the
answers), like an SFT batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.batch import IGNORE_INDEX  # noqa: E402
from model.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from model.family import hf_config_dict
from model.loss import model_loss  # noqa: E402


def bench_config() -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(depth=4, embed_dim=128, num_heads=4, mlp_ratio=4.0),
        text=TextConfig(vocab_size=151936, hidden_size=256, intermediate_size=1024, num_layers=4, num_heads=8,
                        num_kv_heads=2, mrope_section=(4, 6, 6), tie_word_embeddings=False),
    )


# (text before, image grid or None, text after) per sample: mixed lengths, some with images.
LAYOUT = [
    (40, (1, 16, 20), 120),
    (300, None, 220),
    (30, (1, 8, 8), 30),
    (12, None, 48),
    (90, (1, 24, 16), 200),
    (160, None, 120),
    (20, (1, 12, 28), 60),
    (50, (1, 10, 10), 250),
]


def build_batch(cfg: ModelConfig, seed: int = 0):
    from model.parity import SampleBuilder, sample_positions

    gen = torch.Generator().manual_seed(seed)
    b = SampleBuilder(cfg, gen)
    samples, labels = [], []
    for before, grid, after in LAYOUT:
        parts = [before] + ([("image", grid)] if grid else []) + [after]
        s = b.sample(*parts)
        lab = s.input_ids.clone()  # unshifted (transformers' convention)
        lab[: s.input_ids.numel() - int(after * 0.8)] = IGNORE_INDEX  # prompt + image unsupervised: answer only
        samples.append(s)
        labels.append(lab)
    pos = [sample_positions(s, cfg) for s in samples]
    return samples, labels, pos


def hf_inputs(cfg, samples, labels, pos):
    from model.parity import mm_token_type_ids

    B, L = len(samples), max(s.input_ids.numel() for s in samples)
    ids = torch.zeros(B, L, dtype=torch.long)
    lab = torch.full((B, L), IGNORE_INDEX)
    mask = torch.zeros(B, L, dtype=torch.long)
    p = torch.zeros(3, B, L, dtype=torch.long)
    for i, (s, y, q) in enumerate(zip(samples, labels, pos)):
        n = s.input_ids.numel()
        ids[i, :n], lab[i, :n], mask[i, :n], p[:, i, :n] = s.input_ids, y, 1, q
    imgs = [s for s in samples if s.pixel_values is not None]
    return dict(input_ids=ids, attention_mask=mask, labels=lab, position_ids=p,
                mm_token_type_ids=mm_token_type_ids(ids, cfg), pixel_values=torch.cat([s.pixel_values for s in imgs]),
                image_grid_thw=torch.cat([s.image_grid_thw for s in imgs]), use_cache=False)


def our_inputs(samples, labels, pos):
    lengths = [s.input_ids.numel() for s in samples]
    imgs = [s for s in samples if s.pixel_values is not None]
    return dict(
        input_ids=torch.cat([s.input_ids for s in samples]),
        labels=torch.cat([torch.cat([y[1:], torch.tensor([IGNORE_INDEX])]) for y in labels]),  # shifted per sample
        position_ids=torch.cat(pos, dim=1),
        cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
        max_seqlen=max(lengths),
        pixel_values=torch.cat([s.pixel_values for s in imgs]),
        image_grid_thw=torch.cat([s.image_grid_thw for s in imgs]),
    )


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) / 1024


def worker(side: str, reps: int) -> dict:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from model.hf_adapter import from_hf_state_dict
    from model.vlm import VLModel

    cfg = bench_config()
    torch.manual_seed(0)
    hf = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**hf_config_dict(cfg)))
    samples, labels, pos = build_batch(cfg)
    if side == "ours":
        model = VLModel(cfg)
        model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg.text.tie_word_embeddings), strict=True)
        del hf
        inputs = our_inputs(samples, labels, pos)

        def step() -> float:
            loss_sum, n = model_loss(model, **inputs)
            loss = loss_sum / n
            loss.backward()
            return float(loss.detach())
    else:
        model = hf
        inputs = hf_inputs(cfg, samples, labels, pos)

        def step() -> float:
            model.model.rope_deltas = None
            loss = model(**inputs).loss
            loss.backward()
            return float(loss.detach())
    model.train()
    rss0 = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark
    loss = step()  # the first step also serves as warm-up
    peak = _status_mb("VmHWM") - rss0
    times, cpu = [], []
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    n_tokens = int(inputs["input_ids"].numel())
    n_sup = int((inputs["labels"] != IGNORE_INDEX).sum())
    return {"side": side, "loss": loss, "time_s": statistics.median(times), "times": times,
            "cpu_s": statistics.median(cpu), "peak_mb": peak,
            "positions": n_tokens, "supervised": n_sup, "threads": torch.get_num_threads()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per side (0: torch's default)")
    ap.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.reps)))
        return 0
    res = {}
    for side in ("hf", "ours"):
        cmd = [sys.executable, __file__, "--worker", side, "--reps", str(args.reps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            return out.returncode
        res[side] = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = bench_config()
    lengths = [b + (g[0] * g[1] * g[2] // 4 + 2 if g else 0) + a for b, g, a in LAYOUT]
    print(f"config: ViT {cfg.vision.depth}x{cfg.vision.embed_dim}, LLM {cfg.text.num_layers}x{cfg.text.hidden_size} "
          f"(GQA {cfg.text.num_heads}/{cfg.text.num_kv_heads}), vocab {cfg.text.vocab_size}; "
          f"{len(LAYOUT)} samples of {min(lengths)}..{max(lengths)} tokens; torch threads {res['ours']['threads']}")
    h, o = res["hf"], res["ours"]
    for name, r, what in (("transformers", h, "padded"), ("ours", o, "packed")):
        print(f"{name:12} ({what} {r['positions']} positions, {r['supervised']} supervised): {r['time_s']:.3f} s "
              f"fwd+bwd (CPU time {r['cpu_s']:.3f} s), peak +{r['peak_mb']:.0f} MB, loss {r['loss']:.6f}")
    if abs(h["loss"] - o["loss"]) > 1e-4 * max(1.0, abs(h["loss"])):
        print(f"WARNING: losses differ ({h['loss']} vs {o['loss']}): the two sides did not run the same batch")
    print(f"speedup ours/transformers = {h['time_s'] / o['time_s']:.2f}x wall (target >= 2x), "
          f"{h['cpu_s'] / o['cpu_s']:.2f}x CPU time; peak memory ratio = {h['peak_mb'] / max(o['peak_mb'], 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
