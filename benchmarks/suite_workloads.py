"""Workloads of the GPU suite (benchmarks/gpu_suite.py): configs (a)-(e), packed microbatches, timed steps.

Shape legend: T = packed tokens, N = ViT patch rows, S = samples in a microbatch.

Every config runs the trainer's own pieces: a meta-device VLModel, the stage's freeze policy (train.optim),
parallelize() at world size 1 (FSDP2 with bf16 compute / fp32 master weights and reductions, optionally
torch.compile per block), the engine step, global clipping, and build_optimizer (fused AdamW on CUDA); the
microbatch reaches the device through the trainer's DevicePrefetcher (pinned, non-blocking). Microbatches are
synthetic but shaped like the loader's: whole samples back to back, vision blocks of t*h*w/4 pads, raw uint8
pixel rows (588 wide per image, 1176 per video frame pair), M-RoPE ids from model.position_ids, every text
token supervised (pretraining), vision tokens not.

MFU conventions (model/flops.py), each named by what it counts: `mfu_doc_causal` = ViT + merger + LLM + head
matmuls with each packed document's causal attention, L(L+1)/2 pairs, and the head on supervised rows (the work
done; the issue's goal); `mfu_packed_full` = the same matmuls with the decoder's attention over the whole packed
row as one sequence, T^2 pairs, and the head on every token (torchtitan's count, whose seq_len is the packed
length); `mfu_llm_doc_causal` = the decoder + head part of mfu_doc_causal over the same step time (LMMs-Engine
leaves the ViT out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from core.batch import IGNORE_INDEX, PackedBatch

# ------------------------------------------------------------------------------------------ configs
MICROBATCHES_PER_STEP = 4
"""Microbatches per optimizer step in every throughput config: with one, the whole optimizer step (and the
gradient reduction) would sit on the critical path of every microbatch; with four it is amortized as in training."""



@dataclass
class Workload:
    """One throughput config: the model, the stage and the shape of its microbatches."""

    name: str
    preset: str
    overrides: dict[str, Any]
    stage: int
    tokens: int
    """Packed tokens per microbatch."""
    sample_len: int
    """Tokens per packed sample (the last one takes the remainder)."""
    image_grid: tuple[int, int, int] | None = None
    images_per_sample: int = 0
    video_grid: tuple[int, int, int] | None = None
    """One video of this grid in the first sample (its frame pairs are the ViT's attention segments)."""
    ac: str = "none"
    """Activation checkpointing: 'none', 'selective' (per op) or 'full' (every block recomputed)."""
    note: str = ""


# The tiny CPU stand-ins keep each config's structure (stage, images vs video, relative length) at widths a
# 2-core CPU runs in a second.
# A 4096-token vocabulary (control tokens moved to its top): a 151,936-row head and its Adam state would
# take most of a CPU step.
_TINY = {"vision.depth": 2, "vision.embed_dim": 32, "vision.num_heads": 4, "vision.mlp_ratio": 2.0,
         "text.hidden_size": 64, "text.intermediate_size": 128, "text.num_layers": 2, "text.num_heads": 4,
         "text.num_kv_heads": 2, "text.mrope_section": [2, 3, 3], "text.vocab_size": 4096,
         "image_token_id": 4092, "video_token_id": 4093, "vision_start_token_id": 4090, "vision_end_token_id": 4091}


def workloads(cpu: bool) -> dict[str, Workload]:
    """Configs (a)-(e) of issue 10 (GPU), or their tiny stand-ins (--cpu)."""
    if cpu:
        t = dict(_TINY)
        return {
            "a": Workload("a", "tiny", t, 2, 256, 128, (1, 8, 8), 1, note="tiny stand-in of 2B stage 2, images"),
            "b": Workload("b", "tiny", t, 2, 512, 128, (1, 8, 8), 1, note="tiny stand-in of (a) x2 tokens"),
            "c": Workload("c", "tiny", t, 3, 256, 128, (1, 8, 8), 1, note="tiny stand-in of 2B stage 3"),
            "d": Workload("d", "tiny", t, 2, 512, 512, video_grid=(4, 8, 12), ac="full",
                          note="tiny stand-in of long video"),
            "e": Workload("e", "tiny", {**t, "text.hidden_size": 128, "text.intermediate_size": 256,
                                        "text.mrope_section": [4, 6, 6]}, 2, 256, 128, (1, 8, 8), 1,
                          note="tiny stand-in of the 7B-width slice"),
        }
    return {
        # 4 samples of 2048 tokens, 2 images of 448x448 (32x32 patches, 256 tokens) each: 25% vision tokens.
        "a": Workload("a", "2b", {}, 2, 8192, 2048, (1, 32, 32), 2, note="2B stage 2, 8192 tokens, images + text"),
        "b": Workload("b", "2b", {}, 2, 16384, 2048, (1, 32, 32), 2, note="2B stage 2, 16384 tokens"),
        "c": Workload("c", "2b", {}, 3, 8192, 2048, (1, 32, 32), 2, note="2B stage 3 (ViT frozen), 8192 tokens"),
        # One clip of 24 frame pairs at 504x896 px (36x64 patches): 13,824 video tokens, 55,296 ViT rows.
        # 55,296 ViT rows: without recomputation the dry run puts activations at ~150 GB, so full AC.
        "d": Workload("d", "2b", {}, 2, 16384, 16384, video_grid=(24, 36, 64), ac="full",
                      note="2B stage 2, one long video (24 frame pairs, 13,824 tokens) + text, 16384 tokens, "
                           "full activation checkpointing"),
        "e": Workload("e", "7b", {"text.num_layers": 8}, 2, 8192, 2048, (1, 32, 32), 2,
                      note="7B ViT + 8 decoder layers of 7B width, full vocabulary, 8192 tokens"),
    }


def model_config(w: Workload):
    from model.resolve import resolve_model_config
    from train.config import ModelSection

    return resolve_model_config(ModelSection(preset=w.preset, overrides=dict(w.overrides)))


# ------------------------------------------------------------------------------------------ microbatches
def synth_microbatch(mcfg, w: Workload, seed: int, tokens: int | None = None) -> PackedBatch:
    """A packed microbatch of `tokens` (default w.tokens) shaped like the loader's (see the module doc)."""
    from model.position_ids import packed_mrope_position_ids

    T = tokens or w.tokens
    g = torch.Generator().manual_seed(seed)
    m2 = mcfg.vision.spatial_merge_size ** 2
    top = min(mcfg.vision_start_token_id, mcfg.image_token_id, mcfg.text.vocab_size) - 16
    n_samples = max(1, T // w.sample_len)
    ids, labels, lens, img_grids, vid_grids = [], [], [], [], []
    for s in range(n_samples):
        L = T - w.sample_len * (n_samples - 1) if s == n_samples - 1 else w.sample_len
        blocks = []
        if w.video_grid is not None and s == 0:
            blocks.append(("video", w.video_grid))
        blocks += [("image", w.image_grid)] * (w.images_per_sample if w.image_grid else 0)
        vis = [(kind, grid, grid[0] * grid[1] * grid[2] // m2) for kind, grid in blocks]
        n_text = L - sum(n + 2 for _, _, n in vis)
        if n_text < len(vis) + 1:
            raise ValueError(f"config {w.name}: a {L}-token sample cannot hold its vision blocks {blocks}")
        cuts = sorted(torch.randperm(n_text - 1, generator=g)[: len(vis)].add(1).tolist())
        pieces, prev = [], 0
        for (kind, grid, n), cut in zip(vis, cuts):
            pieces.append(torch.randint(0, top, (cut - prev,), generator=g))
            pad = mcfg.image_token_id if kind == "image" else mcfg.video_token_id
            pieces.append(torch.cat([torch.tensor([mcfg.vision_start_token_id]), torch.full((n,), pad),
                                     torch.tensor([mcfg.vision_end_token_id])]))
            (img_grids if kind == "image" else vid_grids).append(grid)
            prev = cut
        pieces.append(torch.randint(0, top, (n_text - prev,), generator=g))
        x = torch.cat(pieces)
        text = x < top
        y = torch.full_like(x, IGNORE_INDEX)
        y[:-1] = torch.where(text[1:], x[1:], torch.full_like(x[1:], IGNORE_INDEX))
        ids.append(x)
        labels.append(y)
        lens.append(L)
    input_ids = torch.cat(ids)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    ig = torch.tensor(img_grids, dtype=torch.long).reshape(-1, 3)
    vg = torch.tensor(vid_grids, dtype=torch.long).reshape(-1, 3)
    pos = packed_mrope_position_ids(input_ids, cu, ig, vg, spatial_merge_size=mcfg.vision.spatial_merge_size,
                                    image_token_id=mcfg.image_token_id, video_token_id=mcfg.video_token_id)
    c, p = mcfg.vision.in_channels, mcfg.vision.patch_size
    n_img, n_vid = int(ig.prod(-1).sum()), int(vg.prod(-1).sum())
    mb = PackedBatch(
        input_ids=input_ids, labels=torch.cat(labels), position_ids=pos, cu_seqlens=cu, max_seqlen=max(lens),
        pixel_values=torch.randint(0, 256, (n_img, c * p * p), generator=g, dtype=torch.uint8),
        image_grid_thw=ig,
        pixel_values_videos=torch.randint(0, 256, (n_vid, mcfg.vision.patch_dim), generator=g, dtype=torch.uint8),
        video_grid_thw=vg, sample_keys=[f"synthetic/{i}" for i in range(n_samples)],
    )
    mb.validate()
    return mb


def microbatch_flops(mcfg, mb: PackedBatch, trainable: list[str]) -> dict[str, float]:
    """Training FLOPs of one microbatch in each MFU convention (the module docstring)."""
    from model.flops import batch_flops

    grids = [mb.image_grid_thw, mb.video_grid_thw]
    f = batch_flops(mcfg, mb.cu_seqlens, grids, n_supervised=mb.num_supervised, trainable=trainable)
    t = batch_flops(mcfg, mb.cu_seqlens, grids, trainable=trainable, attention="packed_full")
    return {"doc_causal": f["total"], "packed_full": t["total"], "llm_doc_causal": f["llm"], "vit": f["vit"]}


# ------------------------------------------------------------------------------------------ clocks
class Clock:
    """Named time marks, each name marked once per microbatch (or once per step): CUDA events on the current
    stream (read after a synchronize), host time on CPU. `seq` keeps every mark in the order it was made."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seq: list[tuple[str, Any]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.seq.append((name, ev))
        else:
            self.seq.append((name, time.perf_counter()))

    def _dt(self, a: Any, b: Any) -> float:
        return float(a.elapsed_time(b)) if self.cuda else (b - a) * 1e3

    def ms(self, a: str, b: str) -> float | None:
        """Sum over occurrences k of (k-th mark b - k-th mark a), in ms; None unless both occur equally often."""
        xs = [t for n, t in self.seq if n == a]
        ys = [t for n, t in self.seq if n == b]
        if not xs or len(xs) != len(ys):
            return None
        return sum(self._dt(x, y) for x, y in zip(xs, ys))

    def until_next(self, a: str) -> float | None:
        """Sum over occurrences of mark a of the time to the mark made right after it, in ms."""
        spans = [self._dt(t, self.seq[i + 1][1]) for i, (n, t) in enumerate(self.seq[:-1]) if n == a]
        return sum(spans) if spans else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ engine
STAGE_FROZEN = {1: ("llm",), 2: (), 3: ("vision",)}


@dataclass
class Engine:
    """A built config: the parallel model, its optimizer and the pieces the timing needs."""

    pm: Any
    optimizer: Any
    mcfg: Any
    device: torch.device
    trainable: list[str]
    n_params: int
    fused_adamw: bool
    prefetcher: Any
    build_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def job_config(w: Workload, device: torch.device, *, compile: bool, compile_backend: str, ac: str = "none",
               tokens: int | None = None, patches: int | None = None, backend: str = "auto",
               microbatches: int = MICROBATCHES_PER_STEP, mixed_precision: str = "bf16"):
    """The JobConfig this config corresponds to (for build_optimizer and the dry run). `backend` is the process
    group's ('auto': nccl on CUDA; the suite passes gloo when NCCL failed its smoke test)."""
    from train.config import config_from_dict

    par = {"mixed_precision": mixed_precision, "device": device.type, "compile": compile,
           "compile_backend": compile_backend, "backend": backend}
    if ac == "selective":
        par.update(activation_checkpoint="selective", ac_selective="op")
    elif ac == "full":
        par["activation_checkpoint"] = "full"
    return config_from_dict({
        "model": {"preset": w.preset, "overrides": dict(w.overrides)},
        # The data section is only read for its budgets (the dry run); the microbatches are synthetic.
        "data": {"datasets": [{"path": "synthetic", "kind": "pretrain"}], "tokenizer": "synthetic",
                 "max_tokens": tokens or w.tokens,
                 "max_patches": patches},
        "parallel": par,
        "train": {"stage": w.stage, "steps": 1000, "global_microbatches": microbatches},
        "optim": {"lr": 1e-5, "warmup_steps": 0},
    })


def build_engine(w: Workload, device: torch.device, *, compile: bool = False, compile_backend: str = "inductor",
                 ac: str = "none", backend: str = "auto", mixed_precision: str = "bf16") -> Engine:
    from model.family import GROUPS, get_family
    from model.vlm import VLModel
    from parallel import init_distributed, parallelize
    from train.optim import apply_freeze, build_optimizer
    from train.prefetch import DevicePrefetcher

    t0 = time.perf_counter()
    cfg = job_config(w, device, compile=compile, compile_backend=compile_backend, ac=ac, backend=backend,
                     mixed_precision=mixed_precision)
    mcfg = model_config(w)
    dims = init_distributed(cfg.parallel)
    frozen = cfg.frozen_groups
    with torch.device("meta"):
        model = VLModel(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    family = get_family(mcfg.family)
    apply_freeze(model.named_parameters(), frozen, family)
    pm = parallelize(model, dims, cfg.parallel)
    torch.manual_seed(0)
    pm.materialize(device)  # random init of this rank's shards on the device (no multi-GB host init)
    opt = build_optimizer(list(pm.named_parameters()), cfg, family)
    fused = bool(opt is not None and opt.defaults.get("fused"))
    trainable = [g for g in GROUPS if g not in frozen]
    return Engine(pm, opt, mcfg, device, trainable, n_params, fused, DevicePrefetcher(device),
                  time.perf_counter() - t0)


def free_engine(e: Engine | None) -> None:
    if e is not None:
        e.pm.modules.clear()
        e.optimizer = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def train_step(e: Engine, host_mbs: list[PackedBatch], clock: Clock | None = None) -> dict[str, float]:
    """One optimizer step over `host_mbs` (gradient accumulation) the way train.trainer runs it: host preparation
    (ParallelModel.prepare) and the prefetcher's copies, the engine step, clipping, AdamW with the skip flag on the
    device, gradients dropped; returns host-side timings (ms) and the loss (read after the step's work)."""
    from train.optim import optimizer_step

    t0 = time.perf_counter()
    mbs = e.prefetcher.to_device(e.pm.prepare(list(host_mbs)))
    data_ms = (time.perf_counter() - t0) * 1e3
    if clock:
        clock.mark("step")
    res = e.pm.step(mbs)
    if clock:
        clock.mark("fb_end")
    gnorm = e.pm.clip_grad_norm_(1.0)
    if clock:
        clock.mark("clip_end")
    if e.optimizer is not None:
        optimizer_step(e.optimizer, ~(torch.isfinite(res.loss_t) & torch.isfinite(gnorm)))
    if clock:
        clock.mark("opt_end")
    for _, p in e.pm.named_parameters():
        p.grad = None
    return {"data_wait_ms": data_ms, "loss": res.loss}


def step_batches(pool: list[PackedBatch], i: int, per_step: int = MICROBATCHES_PER_STEP) -> list[PackedBatch]:
    """The microbatches of step i, taken round-robin from `pool`."""
    return [pool[(i * per_step + j) % len(pool)] for j in range(per_step)]


def timed_steps(e: Engine, pool: list[PackedBatch], *, warmup: int, max_steps: int, deadline: float,
                record: dict[str, Any], per_step: int = MICROBATCHES_PER_STEP,
                warmup_guard: Callable[[], Any] = contextlib.nullcontext) -> None:
    """Warm up (inside `warmup_guard()`: the suite defers its alarm there while a compiled config compiles), then
    time whole steps of `per_step` microbatches (synchronized) until max_steps or the deadline; fills `record`
    as it goes, so a part cut short keeps what it measured."""
    dev = e.device
    flops = [microbatch_flops(e.mcfg, mb, e.trainable) for mb in pool]
    record["warmup_s"] = []
    record["microbatches_per_step"] = per_step
    with warmup_guard():
        for i in range(warmup):
            sync(dev)
            t0 = time.perf_counter()
            st = train_step(e, step_batches(pool, i, per_step))
            sync(dev)
            record["warmup_s"].append(round(time.perf_counter() - t0, 3))
            record["loss_first"] = st["loss"]
    times, waits, toks = [], [], 0
    fl = dict.fromkeys(("doc_causal", "packed_full", "llm_doc_causal"), 0.0)
    for i in range(warmup, warmup + max_steps):
        mbs = step_batches(pool, i, per_step)
        sync(dev)
        t0 = time.perf_counter()
        st = train_step(e, mbs)
        sync(dev)
        times.append(time.perf_counter() - t0)
        waits.append(st["data_wait_ms"])
        for j in range(per_step):
            f = flops[(i * per_step + j) % len(pool)]
            fl = {k: v + f[k] for k, v in fl.items()}
        toks += sum(mb.num_tokens for mb in mbs)
        total = sum(times)
        record.update(timed_steps=len(times), step_ms_median=round(statistics.median(times) * 1e3, 2),
                      tokens_per_s=round(toks / total, 1),
                      **{f"tflops_{k}_per_s": round(v / total / 1e12, 3) for k, v in fl.items()},
                      data_wait_ms_median=round(statistics.median(waits), 3), loss_last=st["loss"])
        if time.perf_counter() > deadline:
            break


def peak_memory(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e9


def dry_run_estimate(w: Workload, device: torch.device, mb: PackedBatch, ac: str = "none") -> float:
    """The dry run's per-rank memory estimate (GB, 1e9) for this config and microbatch size."""
    from train.dry_run import dry_run

    cfg = job_config(w, device, compile=False, compile_backend="inductor", ac=ac, tokens=mb.num_tokens,
                     patches=mb.num_patches)
    cfg.parallel.loss_chunk_size = cfg.parallel.loss_chunk_size or 1024  # the engine's default chunk
    return dry_run(cfg, world_size=1).stages[0].memory["total"]


# ------------------------------------------------------------------------------------------ where the time goes
def step_split(e: Engine, host_mbs: list[PackedBatch]) -> dict[str, float | None]:
    """One step with time marks at the ViT, the decoder and the loss head (forward hooks on the modules, a
    gradient hook on the ViT output, a wrapper around the engine's loss function): ms per phase, summed over
    the step's microbatches.

    The fused loss head computes its gradients inside its forward, so `head` is the head's forward + backward.
    Phases: vit_fwd, llm_fwd, head, llm_bwd (head end -> gradient reaches the vision embeddings), vit_bwd (->
    the next microbatch's start, or the end of the step's backward), other (the rest of the engine step:
    counts, all-reduces, the gradient reduction), clip, optimizer, data_wait."""
    clock = Clock(e.device)
    root = e.pm.module
    hooks = []
    layers = list(root.layers.values())
    if root.visual is not None:
        hooks.append(root.visual.register_forward_pre_hook(lambda m, a: clock.mark("vit_start")))

        def vit_done(m, a, out):
            clock.mark("vit_end")
            tokens = out[0]  # the tower returns (merged tokens, DeepStack features): model/vision.py
            if tokens.requires_grad:
                tokens.register_hook(lambda g: clock.mark("vit_bwd_start"))

        hooks.append(root.visual.register_forward_hook(vit_done))
    hooks.append(layers[0].register_forward_pre_hook(lambda m, a: clock.mark("llm_start")))
    loss_fn = e.pm.loss_fn

    def timed_loss(*args, **kw):
        clock.mark("head_start")
        out = loss_fn(*args, **kw)
        clock.mark("head_end")
        return out

    e.pm.loss_fn = timed_loss
    try:
        st = train_step(e, host_mbs, clock)
        sync(e.device)
    finally:
        e.pm.loss_fn = loss_fn
        for h in hooks:
            h.remove()
    ms = clock.ms
    out = {
        "vit_fwd": ms("vit_start", "vit_end"), "llm_fwd": ms("llm_start", "head_start"),
        "head": ms("head_start", "head_end"),
        "llm_bwd": ms("head_end", "vit_bwd_start"), "vit_bwd": clock.until_next("vit_bwd_start"),
        "clip": ms("fb_end", "clip_end"), "optimizer": ms("clip_end", "opt_end"),
        "data_wait": st["data_wait_ms"], "step_fwd_bwd": ms("step", "fb_end"),
    }
    if out["llm_bwd"] is None:  # ViT frozen (stage 3): the backward ends in the decoder
        out["llm_bwd"] = clock.until_next("head_end")
    known = [out[k] for k in ("vit_fwd", "llm_fwd", "head", "llm_bwd", "vit_bwd") if out[k] is not None]
    if out["step_fwd_bwd"] is not None:
        out["other"] = out["step_fwd_bwd"] - sum(known)
    return {k: (round(v, 3) if v is not None else None) for k, v in out.items()}


def precision_check(e: Engine, host_mb: PackedBatch) -> dict[str, Any]:
    """What bf16 mixed precision does in one step: the dtype of the (sharded) parameters the optimizer sees,
    of a weight and an activation inside the forward, and of the gradients after the step's reduction."""
    root = e.pm.module
    layer = next(iter(root.layers.values()))
    seen: dict[str, str] = {}

    def pre(m, args):
        seen.setdefault("compute_weight", str(m.weight.dtype))
        seen.setdefault("compute_activation", str(args[0].dtype))

    h = layer.mlp.gate_proj.register_forward_pre_hook(pre)
    try:
        (mb,) = e.prefetcher.to_device([host_mb])
        e.pm.step([mb])
    finally:
        h.remove()
    params = [p for _, p in e.pm.named_parameters()]
    grads = {str(p.grad.dtype) for p in params if p.grad is not None}
    for p in params:
        p.grad = None
    return {"master_params": sorted({str(p.dtype) for p in params}), "gradients": sorted(grads), **seen}


def top_kernels(e: Engine, host_mbs: list[PackedBatch], n: int = 15) -> dict[str, Any]:
    """torch.profiler over one step: the n kernels (CUDA) or ops (CPU) with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if e.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        train_step(e, host_mbs)
        sync(e.device)
    rows = []
    for ev in prof.key_averages():
        if e.device.type == "cuda":
            if getattr(ev, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            t = getattr(ev, "self_device_time_total", None)
            t = getattr(ev, "self_cuda_time_total", 0) if t is None else t
        else:
            t = ev.self_cpu_time_total
        if t > 0:
            rows.append((t, ev.key, ev.count))
    rows.sort(reverse=True)
    total = sum(t for t, _, _ in rows) or 1.0
    return {
        "unit": "CUDA kernel self time" if e.device.type == "cuda" else "CPU op self time",
        "total_ms": round(total / 1e3, 3),
        "top": [{"name": k[:120], "ms": round(t / 1e3, 3), "calls": c, "share": round(t / total, 4)}
                for t, k, c in rows[:n]],
    }


def _short(fr) -> str:
    return f"{fr.filename.rsplit('/', 2)[-2]}/{fr.filename.rsplit('/', 1)[-1]}:{fr.lineno}"


def _site() -> str:
    """The innermost frame of this project's code, and the torch function it called on the way (if any)."""
    import traceback

    frames = traceback.extract_stack()[:-3]
    plumbing = ("_python_dispatch", "/_ops.py", "_contextlib", "/_compile.py", "overrides.py", "_tensor.py")
    torch_fns = [fr for fr in frames if "/torch/" in fr.filename and not any(p in fr.filename for p in plumbing)]
    for i in range(len(frames) - 1, -1, -1):
        if "/torch/" not in frames[i].filename:
            inner = [fr for fr in torch_fns if frames.index(fr) > i]
            via = f" via torch {inner[-1].filename.split('/torch/')[-1]}:{inner[-1].name}" if inner else ""
            return _short(frames[i]) + via
    return "?"


def count_syncs(e: Engine, host_mbs: list[PackedBatch]) -> dict[str, Any]:
    """Host-device synchronizations in one step.

    CUDA: torch.cuda.set_sync_debug_mode('warn') turns every synchronizing call into a warning whose location
    is the Python line that made it. CPU (a proxy; nothing synchronizes there): ops that WOULD synchronize on
    a GPU and are visible to a dispatch mode (.item()/int()/float()/bool() of a tensor, nonzero,
    masked_select); host reads that bypass dispatch (.tolist(), .cpu()) are not seen on CPU."""
    import warnings

    sites: Counter = Counter()
    if e.device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_step(e, host_mbs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for wrn in caught:
            if "synchroniz" in str(wrn.message):
                sites[f"{wrn.filename.rsplit('/', 2)[-2]}/{wrn.filename.rsplit('/', 1)[-1]}:{wrn.lineno}"] += 1
        method = "torch.cuda.set_sync_debug_mode('warn')"
    else:
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten
        syncing = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default}

        class _Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func in syncing:
                    sites[_site()] += 1
                return func(*args, **(kwargs or {}))

        with _Count():
            train_step(e, host_mbs)
        method = ("CPU proxy: item()/nonzero/masked_select of any tensor, host ones too (the optimizer's step "
                  "counters); the device-aware CPU count is benchmarks/sync_count.py")
    return {"method": method, "count": sum(sites.values()),
            "sites": [{"where": k, "n": v} for k, v in sites.most_common(25)]}


# ------------------------------------------------------------------------------------------ memory limits
def largest_microbatch(w: Workload, device: torch.device, ac: str, sizes: list[int], deadline: float,
                       record: dict[str, Any], backend: str = "auto") -> None:
    """Grow the microbatch through `sizes` (tokens, the config's sample layout; one microbatch per step: this
    measures memory) until one step runs out of memory or the deadline passes; records the largest that ran,
    the first that did not, and each peak."""
    e = build_engine(w, device, ac=ac, backend=backend)
    record["tried"] = []
    try:
        for T in sizes:
            if time.perf_counter() > deadline:
                record["stopped"] = "time share spent"
                break
            mb = synth_microbatch(e.mcfg, w, seed=T, tokens=T)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                train_step(e, [mb])
                sync(device)
            except torch.cuda.OutOfMemoryError:
                record["first_oom_tokens"] = T
                record["tried"].append({"tokens": T, "oom": True})
                break
            record["largest_tokens"] = T
            record["tried"].append({"tokens": T, "patches": mb.num_patches, "peak_gb": peak_memory(device)})
    finally:
        free_engine(e)


# ------------------------------------------------------------------------------------------ loss head
def loss_head_check(device: torch.device, S: int, D: int, V: int, reps: int) -> dict[str, Any]:
    """model.loss.lm_loss in bf16 against fp32 (loss, d/dh, d/dW relative errors) and its time, fwd + bwd; where
    the device runs the fused chunk body (CUDA), the eager body's time too (`eager_body_*_ms`)."""
    import model.loss as L
    from model.loss import lm_loss

    g = torch.Generator().manual_seed(0)
    h32 = torch.randn(S, D, generator=g).to(device)
    w32 = (torch.randn(V, D, generator=g) * 0.02).to(device)
    y = torch.randint(0, V, (S,), generator=g).to(device)
    out: dict[str, Any] = {"shape": {"S": S, "D": D, "V": V}}
    grads = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        h = h32.to(dt, copy=True).requires_grad_()
        w = w32.to(dt, copy=True).requires_grad_()
        times = []
        for _ in range(reps):
            h.grad = w.grad = None
            sync(device)
            t0 = time.perf_counter()
            loss, _ = lm_loss(h, w, y)
            loss.backward()
            sync(device)
            times.append(time.perf_counter() - t0)
        grads[name] = (float(loss.detach()), h.grad.float(), w.grad.float())
        out[f"{name}_ms"] = round(statistics.median(times) * 1e3, 3)
        if L.chunk_fns(device) is not None:  # the same head through the eager body, for the ratio
            fused_fns, L.chunk_fns = L.chunk_fns, lambda dev: None
            try:
                eager = []
                for _ in range(reps):
                    h.grad = w.grad = None
                    sync(device)
                    t0 = time.perf_counter()
                    lm_loss(h, w, y)[0].backward()
                    sync(device)
                    eager.append(time.perf_counter() - t0)
            finally:
                L.chunk_fns = fused_fns
            out[f"eager_body_{name}_ms"] = round(statistics.median(eager) * 1e3, 3)
    lf, hf, wf = grads["fp32"]
    lb, hb, wb = grads["bf16"]
    out["loss_rel"] = abs(lb - lf) / abs(lf)
    out["grad_h_rel"] = float((hb - hf).norm() / hf.norm())
    out["grad_w_rel"] = float((wb - wf).norm() / wf.norm())
    return out


def describe(w: Workload) -> dict[str, Any]:
    return dataclasses.asdict(w)


def run_with(fn: Callable[[], Any], errors: list[str]) -> Any:
    """fn(), or None with its error appended (for the optional measurements inside a part)."""
    try:
        return fn()
    except Exception as ex:  # noqa: BLE001 - a measurement that fails is recorded, the part goes on
        errors.append(f"{type(ex).__name__}: {ex}"[:500])
        return None
