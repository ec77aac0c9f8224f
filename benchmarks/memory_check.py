"""python benchmarks/memory_check.py [--tokens 1024] [--cases fp32/none bf16/full ...] [--json OUT]

The dry run's memory model (train/dry_run.py), checked on CPU before a GPU measures it (issue 19): a 2B-width
slice (Qwen2-VL-2B's ViT and decoder widths, 2 ViT blocks, 2 decoder layers, a 32,768-token vocabulary so the
head does not dominate a CPU step) is built the way the GPU suite builds its configs (meta device, the stage-2
freeze policy, parallelize() at world size 1: FSDP2 with ZeRO-1 units, the loss head, AdamW), and one training
step of one packed microbatch (1024 tokens: text + one 448x448 image = 1024 ViT rows) is measured for each case:
fp32 or bf16 mixed precision, activation checkpointing none or full.

Each case runs in a fresh process (MALLOC_MMAP_THRESHOLD_ fixed so glibc hands freed blocks back at once):
  - the estimate: dry_run() of the same JobConfig, data.max_tokens / max_patches = the microbatch's;
  - 'tracked': torch's FSDPMemTracker (torch.distributed._tools) over the second step (the first creates the
    optimizer state): live tensor bytes by category at the step's peak, like torch.cuda.max_memory_allocated;
    parameters = sharded + unsharded parameters, gradients = the larger of the sharded + unsharded gradients
    at the peak and right after the backward, optimizer = its state, activations = the rest of the peak
    (activations, temporaries, communication buffers, inputs);
  - 'RSS': the process's peak resident memory during that step above its resident memory before the engine
    was built (what the allocator really held, fragmentation included: a CUDA run's reserved memory).
It prints estimate / measured for each component and for the totals. A CUDA run adds what this cannot show:
docs/perf/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "benchmarks")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SLICE = {"text.num_layers": 2, "vision.depth": 2, "text.vocab_size": 32768, "vision_start_token_id": 32762,
         "vision_end_token_id": 32763, "image_token_id": 32764, "video_token_id": 32765}
"""Overrides of the 2b preset: two blocks of each kind, a 32,768-token vocabulary (control tokens at its top)."""
CASES = ("fp32/none", "fp32/full", "bf16/none", "bf16/full")
COMPONENTS = ("params", "grads", "optimizer", "activations")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
"""glibc: blocks above 64 KiB are mmapped and unmapped on free (no heap growth kept as a high-water mark)."""
GB = 1e9


def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def slice_workload(tokens: int, ac: str, preset: str = "2b"):
    """The measured config: the 2B-width slice, or (preset 'tiny', for tests) the suite's tiny model."""
    import suite_workloads as W

    if preset == "tiny":
        return W.Workload("tiny", "tiny", dict(W._TINY), 2, tokens, tokens, (1, 8, 8), 1, ac=ac)
    return W.Workload("slice", preset, dict(SLICE), 2, tokens, tokens, (1, 32, 32), 1, ac=ac,
                      note="2B-width slice: 2 ViT blocks, 2 decoder layers, 32k vocabulary")


def estimate(w, mb, mp: str, ac: str) -> dict[str, float]:
    """The dry run's per-rank memory (GB) of this config and microbatch (as the GPU suite asks for it)."""
    import suite_workloads as W
    import torch

    from train.dry_run import dry_run

    cfg = W.job_config(w, torch.device("cpu"), compile=False, compile_backend="inductor", ac=ac, tokens=mb.num_tokens,
                       patches=mb.num_patches, microbatches=1, mixed_precision=mp)
    cfg.parallel.loss_chunk_size = cfg.parallel.loss_chunk_size or 1024
    return dict(dry_run(cfg, world_size=1).stages[0].memory)


def _tracked(mt) -> dict[str, int]:
    snap = mt.get_tracker_snapshot("peak")
    (per_dev,) = snap.values()
    return {str(getattr(k, "value", k)): int(v) for k, v in per_dev.items()}


def _now(mt) -> dict[str, int]:
    (per_dev,) = mt.get_tracker_snapshot("current").values()
    return {str(getattr(k, "value", k)): int(v) for k, v in per_dev.items()}


def _sum(snap: dict[str, int], *keys: str) -> int:
    return sum(snap.get(k, 0) for k in keys)


TRANSIENT = ("Activation", "Temp", "All Gather", "Reduce Scatter", "Inputs")


def measure_case(case: str, tokens: int, preset: str = "2b") -> dict[str, Any]:
    """One case in this process: the estimate, then two training steps, the second measured."""
    import suite_workloads as W
    import torch
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    mp, ac = case.split("/")
    dev = torch.device("cpu")
    w = slice_workload(tokens, ac, preset)
    mb = W.synth_microbatch(W.model_config(w), w, seed=0)
    est = estimate(w, mb, mp, ac)
    gc.collect()
    rss0 = _status("VmRSS")
    e = W.build_engine(w, dev, ac=ac, mixed_precision=mp)
    t0 = time.perf_counter()
    W.train_step(e, [mb])  # creates the optimizer state, FSDP2's buffers, first-call caches
    step1_s = time.perf_counter() - t0
    gc.collect()
    rss_before = _status("VmRSS")
    _reset_peak_rss()
    mt = FSDPMemTracker(e.pm.module, e.optimizer)
    snaps: dict[str, dict[str, int]] = {}
    loss_fn = e.pm.loss_fn

    def head(*args, **kw):  # the end of the forward: every saved activation alive, no gradient yet
        snaps["forward_end"] = _now(mt)
        return loss_fn(*args, **kw)

    e.pm.loss_fn = head
    t0 = time.perf_counter()
    with mt:
        (dmb,) = e.prefetcher.to_device([mb])
        res = e.pm.step([dmb])
        snaps["backward_end"] = _now(mt)
        e.pm.clip_grad_norm_(1.0)
        e.optimizer.step()
        for _, p in e.pm.named_parameters():
            p.grad = None
    step2_s = time.perf_counter() - t0
    rss_peak = _status("VmHWM")
    peak = _tracked(mt)
    n_params = e.n_params
    W.free_engine(e)
    fwd, bwd = snaps["forward_end"], snaps["backward_end"]
    measured = {
        # each component at its own high point in the step (the estimate's total adds them up)
        "params": _sum(fwd, "Sharded Param", "Unsharded Param") / GB,
        "grads": max(_sum(peak, "Sharded Grad", "Unsharded Grad"), _sum(bwd, "Sharded Grad", "Unsharded Grad")) / GB,
        "optimizer": peak.get("OptState", 0) / GB,
        "activations": max(_sum(fwd, *TRANSIENT), _sum(peak, *TRANSIENT)) / GB,
        "total_tracked": peak["Total"] / GB, "total_rss": (rss_peak - rss0) / GB,
    }
    measured["activations_saved"] = _sum(fwd, *TRANSIENT) / GB
    # Where the step peaked: in the backward (activations alive), or in the gradient reduction after it, where
    # the transient memory is FSDP2's fp32 reduce-scatter staging and the head's gradients, not activations.
    phase = "backward" if peak.get("Activation", 0) >= 0.25 * fwd.get("Activation", 0) else "grad reduction"
    return {"case": case, "tokens": mb.num_tokens, "patches": mb.num_patches, "params_n": n_params,
            "loss": res.loss, "estimate_gb": {k: est[k] for k in (*COMPONENTS, "total")}, "measured_gb": measured,
            "tracked_peak_bytes": peak, "tracked_forward_end_bytes": fwd,
            "rss_gb": {"before_build": rss0 / GB, "before_step": rss_before / GB, "peak_step": rss_peak / GB},
            "peak_phase": phase, "step_s": [round(step1_s, 1), round(step2_s, 1)]}


def ratios(r: dict[str, Any]) -> dict[str, float | None]:
    """estimate / measured per component, and the estimate's total over the tracked and the RSS peaks."""
    est, got = r["estimate_gb"], r["measured_gb"]
    out: dict[str, float | None] = {k: (est[k] / got[k] if got[k] else None) for k in COMPONENTS}
    if r.get("peak_phase") != "backward":
        out["activations"] = None  # the peak's transient memory is not activations (see measure_case)
    out["total/tracked"] = est["total"] / got["total_tracked"]
    out["total/rss"] = est["total"] / got["total_rss"] if got["total_rss"] > 0 else None
    return out


def table(results: list[dict[str, Any]]) -> str:
    head = f"{'case':<10} {'':<9} " + " ".join(f"{c:>11}" for c in (*COMPONENTS, "total", "tracked", "rss"))
    lines = [head, "-" * len(head)]
    for r in results:
        est, got, q = r["estimate_gb"], r["measured_gb"], ratios(r)
        lines.append(f"{r['case']:<10} {'estimate':<9} " + " ".join(f"{est[c]:>11.3f}" for c in COMPONENTS)
                     + f" {est['total']:>11.3f}")
        lines.append(f"{'':<10} {'measured':<9} " + " ".join(f"{got[c]:>11.3f}" for c in COMPONENTS)
                     + f" {'':>11} {got['total_tracked']:>11.3f} {got['total_rss']:>11.3f}")
        lines.append(f"{'':<10} {'est/meas':<9} " + " ".join(
            f"{q[c]:>11.2f}" if q[c] is not None else f"{'-':>11}" for c in COMPONENTS)
            + f" {'':>11} {q['total/tracked']:>11.2f} " + (f"{q['total/rss']:>11.2f}" if q["total/rss"] else "-"))
        lines.append(f"{'':<10} peak in the {r['peak_phase']}; activations saved at the end of the forward: "
                     f"{got['activations_saved']:.3f} GB")
    return "\n".join(lines)


def run_cases(cases: list[str], tokens: int, threads: int, preset: str = "2b",
              timeout: float = 1800) -> list[dict[str, Any]]:
    """Each case in a fresh process (clean resident-memory baseline); returns their records."""
    out = []
    for case in cases:
        env = {**os.environ, **MALLOC_ENV, "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        cmd = [sys.executable, __file__, "--one", case, "--tokens", str(tokens), "--preset", preset]
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        found = re.findall(r"^MEMORY_CASE (.*)$", p.stdout, re.M)
        if p.returncode != 0 or not found:
            raise RuntimeError(f"case {case} failed (exit {p.returncode}): {p.stderr[-2000:]}")
        out.append(json.loads(found[-1]))
        print(f"[memory_check] {case}: step {out[-1]['step_s']} s", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens of the microbatch (one image + text)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--preset", default="2b", choices=("2b", "tiny"), help="tiny: the suite's tiny model (tests)")
    ap.add_argument("--json", type=Path, default=None, help="also write the records here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.one:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print("MEMORY_CASE " + json.dumps(measure_case(a.one, a.tokens, a.preset), default=str), flush=True)
        return 0
    results = run_cases(a.cases, a.tokens, a.threads, a.preset)
    print("memory of one training step, GB (1e9): the dry run's estimate against FSDPMemTracker's peak by category "
          "and the process's peak RSS\n")
    print(table(results))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
