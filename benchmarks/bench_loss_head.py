"""python benchmarks/bench_loss_head.py [--tokens T] [--width D] [--chunk C] [--reps 5] [--device cpu|cuda]

The fused loss head (model/loss.py) with its two chunk bodies, measured in the same run on the same inputs:
  eager  the in-place body (one fp32 buffer: upcast, row max, subtract, exp, sum, divide, downcast): what CPUs
         run, and what CUDA ran before;
  fused  the GPU body: a row max, then exp-sum and softmax - onehot straight from the logits in their own
         dtype, each compiled into one kernel (inductor; on CPU it generates C++, on CUDA Triton).
Forward + backward of lm_loss (the three head matmuls included) at the real 151,936 vocabulary, fp32 and bf16;
prints the median time of each body and the ratio fused / eager, and the memory traffic over one chunk's logits
that each body needs (what decides on a GPU, where these passes are bandwidth-bound; a CPU is compute-bound on
the exps, so its ratio says little about a GPU's). Defaults: 2B's head on CUDA (4096 tokens, width 1536, chunks
of 1024); on CPU a narrow one (512 tokens, width 64, chunks of 256), so that the chunk bodies, not the matmuls,
take the time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import model.loss as L  # noqa: E402

VOCAB = 151936


def chunk_bytes(rows: int, vocab: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes each body reads + writes over one chunk's (rows x vocab) logits, beyond the matmuls.

    eager: upcast (read d, write 4; none in fp32), row max (read 4), subtract (4 + 4), exp (4 + 4), sum (4),
    divide (4 + 4), downcast (read 4, write d; none in fp32). fused: row max, exp-sum and the gradient each read
    the logits once (d), the gradient is written once (d)."""
    n, d = rows * vocab, torch.finfo(dtype).bits // 8
    casts = 0 if d == 4 else (d + 4) * 2
    return {"eager": n * (casts + 4 + 8 + 8 + 4 + 8), "fused": n * (3 * d + d)}


def _time(fn, reps: int, sync) -> float:
    fn()  # warm-up (and, for the fused body, the compile)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, help="supervised tokens through the head (every one supervised)")
    ap.add_argument("--width", type=int, help="hidden width (2B: 1536)")
    ap.add_argument("--chunk", type=int, help="rows per chunk (parallel.loss_chunk_size)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    args.tokens = args.tokens or (4096 if gpu else 512)
    args.width = args.width or (1536 if gpu else 64)
    args.chunk = args.chunk or (1024 if gpu else 256)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    # As model/loss.py compiles them (dynamic shapes), here on any device.
    fused = (torch.compile(L._softmax_stats, dynamic=True), torch.compile(L._softmax_grad, dynamic=True))
    print(f"device {dev} ({torch.cuda.get_device_name() if gpu else 'cpu'}), torch {torch.__version__}, "
          f"tokens {args.tokens}, width {args.width}, vocab {VOCAB}, chunk {args.chunk}, threads "
          f"{torch.get_num_threads()}")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(args.tokens, args.width, generator=g).to(dev, dtype).requires_grad_()
        w = (torch.randn(VOCAB, args.width, generator=g) * 0.02).to(dev, dtype).requires_grad_()
        y = torch.randint(0, VOCAB, (args.tokens,), generator=g).to(dev)

        def step(fns, h=h, w=w, y=y):
            L.chunk_fns = lambda device, fns=fns: fns
            h.grad = w.grad = None
            loss, n = L.lm_loss(h, w, y, chunk_size=args.chunk)
            (loss / n).backward()
            return loss.detach()

        original = L.chunk_fns
        try:
            t0 = time.perf_counter()
            want, got = step(None), step(fused)
            compile_s = time.perf_counter() - t0
            t_eager, t_fused = _time(lambda: step(None), args.reps, sync), _time(lambda: step(fused), args.reps, sync)
        finally:
            L.chunk_fns = original
        b = chunk_bytes(args.chunk, VOCAB, dtype)
        name = str(dtype).removeprefix("torch.")
        print(f"{name}: eager {t_eager * 1e3:.1f} ms, fused {t_fused * 1e3:.1f} ms, ratio fused/eager "
              f"{t_fused / t_eager:.2f} (first calls incl. compile {compile_s:.1f} s); loss rel diff "
              f"{abs(float(got - want)) / abs(float(want)):.1e}; logits traffic per chunk: eager "
              f"{b['eager'] / 1e9:.2f} GB, fused {b['fused'] / 1e9:.2f} GB (ratio {b['fused'] / b['eager']:.2f})")


if __name__ == "__main__":
    main()
