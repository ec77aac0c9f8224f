"""python benchmarks/bench_optimizer.py [--reps 7] [--configs tiny tiny-2b-depth 2b-slice]

The optimizer step at dp = 1, where FSDP2 still makes every parameter a DTensor (on a 1-rank mesh): torch's AdamW
over the DTensors (every foreach op through DTensor's dispatch) against train/optim.py's ShardLocalAdamW (the same
ops on the local tensors), measured in one process, one after the other on the same parameters and gradients.
Prints the median step time of each and the ratio local / DTensor, per config:
  tiny           the tiny preset (qwen2_vl);
  tiny-2b-depth  the tiny widths with 2B's depth (32 ViT blocks, 28 decoder layers): 2B's parameter count in
                 tensors, where the per-op dispatch cost shows;
  2b-slice       Qwen2-VL-2B's widths, 2 ViT blocks and 2 decoder layers, a 32,768-token vocabulary (the
                 memory check's slice), where the arithmetic dominates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.resolve import resolve_model_config  # noqa: E402
from model.vlm import VLModel  # noqa: E402
from parallel import ParallelConfig, init_distributed, parallelize  # noqa: E402
from train.config import ModelSection  # noqa: E402
from train.optim import ShardLocalAdamW  # noqa: E402

SLICE = {"text.num_layers": 2, "vision.depth": 2, "text.vocab_size": 32768, "vision_start_token_id": 32762,
         "vision_end_token_id": 32763, "image_token_id": 32764, "video_token_id": 32765}
CONFIGS = {
    "tiny": ("tiny", {}),
    "tiny-2b-depth": ("tiny", {"text.num_layers": 28, "vision.depth": 32}),
    "2b-slice": ("2b", SLICE),
}


def step_times(opts: dict[str, torch.optim.Optimizer], reps: int) -> dict[str, float]:
    """Median step time of each optimizer, their steps interleaved (a neighbour's load hits both alike)."""
    for opt in opts.values():
        opt.step()  # creates the state
    times: dict[str, list[float]] = {k: [] for k in opts}
    for _ in range(reps):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = ap.parse_args()
    cfg = ParallelConfig(dp=1)
    dims = init_distributed(cfg)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, AdamW foreach, dp = 1 (FSDP2, 1-rank mesh)")
    for name in args.configs:
        preset, overrides = CONFIGS[name]
        torch.manual_seed(0)
        pm = parallelize(VLModel(resolve_model_config(ModelSection(preset=preset, overrides=dict(overrides)))),
                         dims, cfg)
        params = [p for p in pm.parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.grad = p.detach().clone()
            p.grad.to_local().copy_(torch.randn(p.to_local().shape, generator=g) * 1e-3)
        res = step_times({cls.__name__: cls(params, lr=1e-5, weight_decay=0.1, foreach=True)
                          for cls in (torch.optim.AdamW, ShardLocalAdamW)}, args.reps)
        numel = sum(p.numel() for p in params)
        print(f"{name}: {len(params)} parameter tensors ({numel / 1e6:.1f} M): AdamW over DTensors "
              f"{res['AdamW'] * 1e3:.1f} ms, ShardLocalAdamW {res['ShardLocalAdamW'] * 1e3:.1f} ms, ratio "
              f"local / DTensor {res['ShardLocalAdamW'] / res['AdamW']:.2f}")


if __name__ == "__main__":
    main()
