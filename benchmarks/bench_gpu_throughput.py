"""python benchmarks/bench_gpu_throughput.py            # one GPU: tiny + ~1B config, bf16, < 4 minutes
python benchmarks/bench_gpu_throughput.py --cpu      # CPU smoke: tiny config, 2 steps (checks the script works)

Single-device training throughput of the parallel engine (world size 1: the same ParallelModel.step the
trainer runs, FSDP2 with bf16 compute / fp32 master weights, AdamW step included) on packed microbatches with
images and text, for the tiny config and a ~1B-parameter Qwen2-VL. Prints the device name, tokens/s and MFU.

MFU = model FLOPs per second / peak dense bf16 FLOPs of the device (H100 SXM and H200: 989e12; pass
--peak-flops for others). Model FLOPs come from model/flops.py (every matmul of ViT + merger + LLM + head on
supervised positions, forward + backward, causal attention counted as the L(L+1)/2 pairs a causal kernel
computes; `dense-attn MFU` counts L^2 pairs, the torchtitan/Megatron convention). Attention backend: 'auto'
(flash-attn varlen if installed, else torch varlen attention, else SDPA); the one used is printed.

A hard wall-clock limit (--time-limit, default 220 s) bounds the whole run: each config stops timing when its
share of the budget is spent and reports what it measured.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from core.batch import IGNORE_INDEX, PATCH_DIM, PackedBatch  # noqa: E402
from model.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "B200": 2250e12}
IMG = 151655


def tiny_config(vocab: int = 151936) -> ModelConfig:
    """model.config.tiny() (the real vocabulary); the CPU smoke run shrinks the vocabulary, because a
    151,936-row bf16 head dominates a CPU step."""
    ids = {} if vocab > IMG else {"image_token_id": vocab - 4, "video_token_id": vocab - 3,
                                  "vision_start_token_id": vocab - 2, "vision_end_token_id": vocab - 1}
    return ModelConfig(
        vision=VisionConfig(depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0),
        text=TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                        num_kv_heads=2, mrope_section=(2, 3, 3), tie_word_embeddings=False),
        **ids,
    )


def one_b_config() -> ModelConfig:
    """~1.1B parameters: a 16-block 1280-wide ViT (half of Qwen2-VL's) and a 12-layer Qwen2-1.5B-wide decoder."""
    return ModelConfig(
        vision=VisionConfig(depth=16, embed_dim=1280, num_heads=16),
        text=TextConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=12, num_heads=12,
                        num_kv_heads=2, tie_word_embeddings=True),
    )


def packed_microbatch(mcfg: ModelConfig, tokens: int, image_grid: tuple[int, int], n_images: int,
                      seed: int) -> PackedBatch:
    """Samples of ~tokens/4 each, the first n_images with one image of image_grid patches; ~half supervised."""
    from model.position_ids import packed_mrope_position_ids

    IMG, VSTART, VEND = mcfg.image_token_id, mcfg.vision_start_token_id, mcfg.vision_end_token_id
    top = min(150000, mcfg.vision_start_token_id - 16)
    g = torch.Generator().manual_seed(seed)
    h, w = image_grid
    per_img = h * w // 4
    ids, labels, lens, grids = [], [], [], []
    n_samples = 4
    remaining = tokens
    for s in range(n_samples):
        L = remaining if s == n_samples - 1 else tokens // n_samples
        remaining -= L
        parts = []
        if s < n_images:
            text = L - per_img - 2
            parts = [torch.randint(0, top, (text // 2,), generator=g), torch.tensor([VSTART]),
                     torch.full((per_img,), IMG), torch.tensor([VEND]),
                     torch.randint(0, top, (text - text // 2,), generator=g)]
            grids.append((1, h, w))
        else:
            parts = [torch.randint(0, top, (L,), generator=g)]
        x = torch.cat(parts)
        y = torch.full_like(x, IGNORE_INDEX)
        y[L // 2 : -1] = x[L // 2 + 1 :]
        y[(x == IMG) | (x == VSTART)] = IGNORE_INDEX
        ids.append(x)
        labels.append(y)
        lens.append(L)
    input_ids = torch.cat(ids)
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    grid = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    pos = packed_mrope_position_ids(input_ids, cu, grid, None, image_token_id=IMG, video_token_id=mcfg.video_token_id)
    return PackedBatch(input_ids=input_ids, labels=torch.cat(labels), position_ids=pos, cu_seqlens=cu,
                       max_seqlen=max(lens), pixel_values=torch.randn(int(grid.prod(-1).sum()), PATCH_DIM,
                                                                      generator=g), image_grid_thw=grid)


def bench(name: str, mcfg: ModelConfig, tokens: int, image_grid: tuple[int, int], n_images: int, steps: int,
          warmup: int, budget_s: float, device: torch.device, peak: float | None) -> dict:
    from model.attention import resolve_backend
    from model.flops import batch_flops
    from model.qwen2_vl import Qwen2VL
    from parallel import ParallelConfig, init_distributed, parallelize

    t_start = time.perf_counter()
    cfg = ParallelConfig(mixed_precision="bf16", device=device.type)
    dims = init_distributed(cfg)
    with torch.device("meta"):
        model = Qwen2VL(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    pm = parallelize(model, dims, cfg)
    pm.materialize(device)  # random init on the device (no 1B-parameter CPU init)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-5, foreach=True)
    mbs = [packed_microbatch(mcfg, tokens, image_grid, n_images, seed=i).to(device) for i in range(4)]
    flops = [batch_flops(mcfg, mb.cu_seqlens, mb.image_grid_thw, n_supervised=mb.num_supervised) for mb in mbs]
    flops_dense = [batch_flops(mcfg, mb.cu_seqlens, mb.image_grid_thw, n_supervised=mb.num_supervised,
                               causal_halving=False) for mb in mbs]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times, done_flops, done_dense, done_tokens = [], 0.0, 0.0, 0
    for i in range(warmup + steps):
        k = i % len(mbs)
        sync()
        t0 = time.perf_counter()
        pm.step([mbs[k]])
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            done_flops += flops[k]["total"]
            done_dense += flops_dense[k]["total"]
            done_tokens += mbs[k].num_tokens
        if time.perf_counter() - t_start > budget_s and len(times) >= 1:
            break
    total = sum(times)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    res = {
        "config": name, "params_B": n_params / 1e9, "tokens_per_step": tokens, "timed_steps": len(times),
        "step_s_median": statistics.median(times), "tokens_per_s": done_tokens / total,
        "tflops_per_s": done_flops / total / 1e12,
        "mfu": done_flops / total / peak if peak else None,
        "mfu_dense_attn": done_dense / total / peak if peak else None,
        "attn_backend": resolve_backend(mcfg.attn_backend, device, torch.bfloat16), "peak_mem_GiB": mem,
    }
    del pm, opt, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description="single-device throughput and MFU (bf16)")
    ap.add_argument("--cpu", action="store_true", help="CPU smoke run: tiny config, 2 steps")
    ap.add_argument("--configs", nargs="+", default=None, choices=["tiny", "1b"])
    ap.add_argument("--tokens", type=int, default=8192, help="packed tokens per microbatch (GPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--time-limit", type=float, default=220.0, help="hard wall-clock limit of the whole run (s)")
    ap.add_argument("--peak-flops", type=float, default=None, help="peak dense bf16 FLOP/s of the device")
    a = ap.parse_args()

    # Hard limit: whatever happens (a hung kernel, a slow init), the process ends by then.
    signal.signal(signal.SIGALRM, lambda *_: (print(f"TIME LIMIT {a.time_limit:.0f}s reached", flush=True),
                                              os._exit(3)))
    signal.alarm(int(a.time_limit) + 15)
    t_begin = time.perf_counter()
    if a.cpu:
        device, configs, tokens, steps, warmup, grid = torch.device("cpu"), ["tiny"], 256, 2, 1, (8, 8)
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --cpu for the CPU smoke run")
        device, configs, tokens, steps, warmup = torch.device("cuda", 0), ["tiny", "1b"], a.tokens, a.steps, a.warmup
        grid = (32, 32)  # 1024 patches, 256 vision tokens per image
        torch.backends.cuda.matmul.allow_tf32 = True
    configs = a.configs or configs
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    peak = a.peak_flops or next((v for k, v in PEAK_BF16.items() if k in name), None)
    print(f"device: {name}  torch {torch.__version__}  peak bf16 dense: "
          f"{f'{peak:.3g} FLOP/s' if peak else 'unknown (no MFU; pass --peak-flops)'}", flush=True)
    builders = {"tiny": (lambda: tiny_config(1024)) if a.cpu else tiny_config, "1b": one_b_config}
    for i, c in enumerate(configs):
        left = a.time_limit - (time.perf_counter() - t_begin)
        budget = left / (len(configs) - i) - 10
        r = bench(c, builders[c](), tokens, grid, 2, steps, warmup, max(budget, 5.0), device, peak)
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mfu_d = f"{100 * r['mfu_dense_attn']:.1f}%" if r["mfu_dense_attn"] is not None else "n/a"
        mem = f"{r['peak_mem_GiB']:.1f} GiB" if device.type == "cuda" else "n/a"
        print(f"{c:>5}: {r['params_B'] * 1e3:,.1f}M params, {r['tokens_per_step']} tokens/step, "
              f"attn={r['attn_backend']}, "
              f"{r['timed_steps']} timed steps, step {r['step_s_median'] * 1e3:.1f} ms, "
              f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops_per_s']:.1f} TFLOP/s, MFU {mfu} "
              f"(dense-attn MFU {mfu_d}), peak mem {mem}", flush=True)
    print(f"total wall {time.perf_counter() - t_begin:.1f}s")
    signal.alarm(0)


if __name__ == "__main__":
    main()
