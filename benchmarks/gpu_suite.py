"""python benchmarks/gpu_suite.py --out DIR           # one H100/H200: correctness, then MFU, <= 8 minutes
python benchmarks/gpu_suite.py --out DIR --cpu     # the same code paths on tiny shapes, < 90 s (CI runs it)

The one prepared GPU command of issue 10. It installs and downloads nothing, and writes DIR/report.json and
DIR/report.md (device, torch / CUDA / Triton versions, date) after every part, so a run cut short, or a part
that fails (its error is recorded, the others still run), still leaves a report; commit it under docs/perf/.

Parts, in priority order (docs/perf/README.md says what each measures and its tolerance):
  env          device, versions, available attention kernels, a measured bf16 matmul rate
  parity       model.parity against transformers on a tiny random checkpoint: fp32 (tol 1e-4) and bf16
  backends     every attention backend against an fp32 per-segment SDPA reference on packed ViT (frame-pair
               segments) and LLM (causal samples) shapes, forward and backward, with timings; then the whole
               model on a packed image + video microbatch with each backend against SDPA
  golden       30 steps of the tiny golden recipe through train.trainer (loader, NCCL/gloo group, prefetcher,
               fused AdamW) against the CPU losses recorded in tests/assets/tiny_train_losses.json
  gpu_tests    pytest -m gpu on the test files that hold GPU-marked tests
  loss_head    the chunked fused loss head in bf16 against fp32 (agreement and time)
  a_eager      config (a): throughput, MFU (3 conventions), peak memory vs the dry run's estimate
  a_compiled   config (a) with parallel.compile (per-block torch.compile, dynamic shapes)
  a_profile    config (a): step time split, top-15 kernels (torch.profiler), host-device syncs in one step
  b, c, d, e   configs (b)-(e), eager then compiled in the part's share
  ac_limits    the largest microbatch of config (a) that fits, per activation-checkpointing policy

Time: --time-limit (default 450 s GPU, 80 s CPU; add ~8 s of Python and torch start-up) is shared out by
fixed weights; a part stops when its share is spent (a SIGALRM interrupts it; it keeps what it measured) and
unspent time goes to the parts after it. A watchdog ends the process 20 s after the limit whatever is running;
the report written so far stays.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "benchmarks")):
    if p not in sys.path:
        sys.path.insert(0, p)

import suite_workloads as W  # noqa: E402
import torch  # noqa: E402

# Relative weights of the parts' time shares (GPU; --cpu uses CPU_WEIGHTS).
WEIGHTS = {"env": 8, "parity": 30, "backends": 45, "golden": 35, "gpu_tests": 40, "loss_head": 10,
           "a_eager": 35, "a_compiled": 110, "a_profile": 25, "b": 30, "c": 30, "d": 35, "e": 35, "ac_limits": 40}
CPU_WEIGHTS = {"env": 3, "parity": 8, "backends": 8, "golden": 12, "gpu_tests": 10, "loss_head": 1,
               "a_eager": 3, "a_compiled": 26, "a_profile": 4, "b": 2, "c": 2, "d": 2, "e": 2, "ac_limits": 4}
BF16_U = 2.0**-8
"""bf16 unit roundoff (8 significand bits)."""
PARITY_TOL = {"fp32": 1e-4, "bf16_rel": 8 * BF16_U}
"""model.parity: fp32 max |logit diff| <= 1e-4 (its default); bf16 <= 8 bf16 ulps of the largest |logit|."""
ATTN_TOL = {"fp32": 1e-5, "bf16": 2e-2}
"""Attention backends vs the fp32 reference, relative L2 error of outputs and input gradients (bf16 operands
land between 1e-3 and 1e-2; fp32 far below 1e-5)."""
LOSS_HEAD_TOL = {"loss_rel": 2 * BF16_U, "grad_rel": 4 * BF16_U}
"""bf16 loss head vs fp32: loss within 2 ulps, gradients (relative L2) within 4 ulps of bf16."""


class PartTimeout(BaseException):
    """A part's time share is spent (a BaseException: the parts' `except Exception` must not swallow it)."""


# ------------------------------------------------------------------------------------------ the runner
class Suite:
    def __init__(self, out: Path, cpu: bool, time_limit: float) -> None:
        self.out, self.cpu, self.time_limit = out, cpu, time_limit
        self.device = torch.device("cpu") if cpu else torch.device("cuda", 0)
        self.t0 = time.perf_counter()
        self.report: dict[str, Any] = {"meta": {}, "parts": {}}
        self.lock = threading.Lock()
        self.current: str | None = None
        self.deadline = 0.0

    def left(self) -> float:
        return self.time_limit - (time.perf_counter() - self.t0)

    def write(self) -> None:
        with self.lock:
            self.report["meta"]["wall_s"] = round(time.perf_counter() - self.t0, 2)
            self.out.mkdir(parents=True, exist_ok=True)
            tmp = self.out / "report.json.tmp"
            tmp.write_text(json.dumps(self.report, indent=1, default=str))
            tmp.replace(self.out / "report.json")
            (self.out / "report.md").write_text(markdown(self.report))

    def run(self, parts: dict[str, Callable[[Suite, dict], None]], weights: dict[str, float]) -> None:
        names = list(parts)
        for i, name in enumerate(names):
            rest = sum(weights[n] for n in names[i:])
            share = max(1.0, self.left() * weights[name] / rest)
            rec: dict[str, Any] = {"status": "running", "share_s": round(share, 1)}
            self.report["parts"][name] = rec
            self.current = name
            if self.left() < 1.0:
                rec["status"] = "skipped: the suite's time limit was reached"
                self.write()
                continue
            t = time.perf_counter()
            self.deadline = t + share
            signal.setitimer(signal.ITIMER_REAL, share)
            try:
                parts[name](self, rec)
                rec["status"] = rec.get("verdict", "ok")
            except PartTimeout:
                rec["status"] = "stopped: time share spent (what it measured is kept)"
            except Exception as ex:  # noqa: BLE001 - one failing part must not stop the suite
                rec["status"] = "error"
                rec["error"] = f"{type(ex).__name__}: {ex}"[:2000]
                rec["traceback"] = traceback.format_exc()[-4000:]
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                W.free_engine(None)
            rec["seconds"] = round(time.perf_counter() - t, 2)
            print(f"[gpu_suite] {name}: {rec['status']} ({rec['seconds']} s)", flush=True)
            self.write()
        self.current = None


def _alarm(signum, frame):  # noqa: ARG001
    raise PartTimeout()


def _watchdog(suite: Suite, grace: float) -> None:
    while True:
        time.sleep(1.0)
        if suite.left() < -grace:
            rec = suite.report["parts"].get(suite.current or "", {})
            rec["status"] = "killed: the suite's hard limit was reached"
            try:
                suite.write()
            finally:
                print("[gpu_suite] hard time limit reached: exiting", flush=True)
                os._exit(3)


# ------------------------------------------------------------------------------------------ parts
def part_env(s: Suite, rec: dict) -> None:
    from model.attention import _torch_varlen, _torch_varlen_params, available_backends
    from train.metrics import device_peak_tflops

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    dev = s.device
    rec.update(
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
        triton=version("triton") or version("pytorch-triton"), transformers=version("transformers"),
        flash_attn=version("flash-attn"), python=platform.python_version(),
        backends_bf16=available_backends(dev, torch.bfloat16), backends_fp32=available_backends(dev, torch.float32),
        torch_varlen_kwargs=sorted(_torch_varlen_params()) if _torch_varlen() is not None else None,
        peak_bf16_tflops=device_peak_tflops(dev), cpu_threads=torch.get_num_threads(),
    )
    if dev.type == "cuda":
        rec["gpu_memory_gb"] = round(torch.cuda.get_device_properties(dev).total_memory / 1e9, 1)
    # The achievable dense bf16 rate on this device (random data), to read MFU against.
    n, reps = (8192, 10) if dev.type == "cuda" else (512, 3)
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    W.sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    W.sync(dev)
    rec["matmul_bf16_tflops_measured"] = round(2 * n**3 * reps / (time.perf_counter() - t) / 1e12, 2)
    rec["matmul_n"] = n
    s.report["meta"].update({k: rec[k] for k in ("device", "torch", "cuda", "triton")})


def part_parity(s: Suite, rec: dict) -> None:
    from model.parity import make_tiny_checkpoint, run_parity

    dev = s.device.type
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as tmp:
        make_tiny_checkpoint(tmp)
        worst, res = run_parity(tmp, tol=PARITY_TOL["fp32"], dtype="fp32", device=dev, print_fn=lambda _: None)
        rec["fp32"] = {"max_abs_logit_diff": worst, "tol": PARITY_TOL["fp32"], "ok": worst <= PARITY_TOL["fp32"],
                       "cases": {r.name: r.max_abs_diff for r in res}}
        if s.cpu:
            # On CPU transformers and this model run the same bf16 kernels (bitwise equal logits): the bf16 check
            # means something on CUDA only, where our varlen kernel meets transformers' SDPA.
            rec["bf16"] = {"ok": True, "note": "GPU only"}
            rec["verdict"] = "pass" if rec["fp32"]["ok"] else "FAIL"
            return
        worst, res = run_parity(tmp, tol=1.0, dtype="bf16", device=dev, print_fn=lambda _: None)
        scale = max(r.max_abs_logit for r in res)
        tol = PARITY_TOL["bf16_rel"] * max(scale, 1.0)
        rec["bf16"] = {"max_abs_logit_diff": worst, "tol": tol, "ok": worst <= tol, "max_abs_logit": scale,
                       "cases": {r.name: r.max_abs_diff for r in res}}
    rec["verdict"] = "pass" if rec["fp32"]["ok"] and rec["bf16"]["ok"] else "FAIL"


def _packed_qkv(lengths: list[int], H: int, Hkv: int, Dh: int, device, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, Dh, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def part_backends(s: Suite, rec: dict) -> None:
    from model.attention import available_backends, sdpa_segment_loop, varlen_attention

    dev = s.device
    dtype = torch.float32 if s.cpu else torch.bfloat16
    tol = ATTN_TOL["fp32" if s.cpu else "bf16"]
    if s.cpu:
        shapes = {"vit": ([64] * 3 + [96] * 2, 4, 4, 8, False), "llm": ([100, 37, 250, 1], 4, 2, 16, True)}
    else:
        # ViT of (a)/(d): 8 images of 32x32 patches and 4 frame pairs of 36x64; LLM of (a): 4 samples, 8192 tokens.
        shapes = {"vit": ([1024] * 8 + [2304] * 4, 16, 16, 80, False),
                  "llm": ([2048, 1500, 3000, 1644], 12, 2, 128, True)}
    ok = True
    unsupported: list[str] = []  # raised instead of computing: recorded, not a wrong result
    rec["kernels"] = {}
    for kind, (lengths, H, Hkv, Dh, causal) in shapes.items():
        q, k, v, cu = _packed_qkv(lengths, H, Hkv, Dh, dev, dtype, seed=len(lengths))
        go = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
        qf, kf, vf = (t.detach().float().clone().requires_grad_() for t in (q, k, v))
        ref = sdpa_segment_loop(qf, kf, vf, cu, causal=causal)
        ref.backward(go.float())
        out: dict[str, Any] = {"lengths": lengths, "heads": [H, Hkv], "head_dim": Dh, "causal": causal}
        trainable = available_backends(dev, dtype)
        for b in _order(available_backends(dev, dtype, training=False)):
            r: dict[str, Any] = {}
            grad = b in trainable  # flex on CPU runs forward only (torch has no CPU flex backward)
            try:
                qq, kk, vv = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
                o = varlen_attention(qq, kk, vv, cu, max(lengths), causal=causal, backend=b)
                r["out_rel"] = float((o.float() - ref).norm() / ref.norm())
                r["ok"] = r["out_rel"] <= tol
                if grad:
                    o.backward(go)
                    r["grad_rel"] = max(float((a.grad.float() - c.grad).norm() / c.grad.norm())
                                        for a, c in ((qq, qf), (kk, kf), (vv, vf)))
                    r["ok"] &= r["grad_rel"] <= tol
                else:
                    r["note"] = "forward only here"
                times = []
                for _ in range(3 if s.cpu else 10):
                    qq.grad = kk.grad = vv.grad = None
                    W.sync(dev)
                    t = time.perf_counter()
                    o = varlen_attention(qq, kk, vv, cu, max(lengths), causal=causal, backend=b)
                    if grad:
                        o.backward(go)
                    W.sync(dev)
                    times.append(time.perf_counter() - t)
                r["fwd_bwd_ms" if grad else "fwd_ms"] = round(sorted(times)[len(times) // 2] * 1e3, 3)
            except Exception as ex:  # noqa: BLE001 - a backend that fails here is a finding, not the end
                r = {"ok": None, "error": f"{type(ex).__name__}: {ex}"[:600]}
                unsupported.append(f"{kind}/{b}")
            ok &= r["ok"] is not False
            out[b] = r
        rec["kernels"][kind] = out
    rec["tolerance"] = tol
    # The whole model on a packed microbatch with images AND video, each backend against SDPA.
    from model.qwen2_vl import Qwen2VL

    w = W.Workload("mix", "tiny", dict(W._TINY), 2, 384, 192, (1, 8, 8), 1, video_grid=(2, 8, 8))
    mcfg = W.model_config(w)
    mb = W.synth_microbatch(mcfg, w, seed=3).to(dev)
    torch.manual_seed(0)
    model = Qwen2VL(mcfg).to(dev, dtype)
    with torch.no_grad():
        hs = {}
        for b in _order(available_backends(dev, dtype, training=False)):
            for mod in model.modules():
                if hasattr(mod, "backend"):
                    mod.backend = b
            try:
                hs[b] = model(**mb.model_inputs()).float()
            except Exception as ex:  # noqa: BLE001
                hs[b] = f"{type(ex).__name__}: {ex}"[:600]
    ref_h = hs["sdpa"]
    if isinstance(ref_h, str):
        raise RuntimeError(f"the SDPA reference itself failed on the packed image + video microbatch: {ref_h}")
    rec["model"] = {"microbatch": {"tokens": mb.num_tokens, "images": int(mb.image_grid_thw.shape[0]),
                                   "videos": int(mb.video_grid_thw.shape[0]), "patches": mb.num_patches}}
    for b, h in hs.items():
        if isinstance(h, str):
            rec["model"][b] = {"ok": None, "error": h}
            unsupported.append(f"model/{b}")
        else:
            rel = float((h - ref_h).norm() / ref_h.norm())
            rec["model"][b] = {"hidden_rel_vs_sdpa": rel, "ok": rel <= tol}
            ok &= rel <= tol
    if "sdpa" in unsupported or "model/sdpa" in unsupported:
        ok = False
    rec["unsupported"] = unsupported
    rec["verdict"] = ("pass" + (f" (raised, see records: {unsupported})" if unsupported else "")) if ok else "FAIL"


def _order(backends: list[str]) -> list[str]:
    """The reference first, flex (compiles on first use) last, so a share cut short still compares the rest."""
    rank = {"sdpa": 0, "torch_varlen": 1, "flash": 2, "flex": 3}
    return sorted(backends, key=lambda b: rank.get(b, 9))


def part_golden(s: Suite, rec: dict) -> None:
    from tiny_corpus import GOLDEN_ASSET, compare_losses, make_tiny_corpus, run_golden

    want = json.loads(GOLDEN_ASSET.read_text())
    tol = want["tolerance"]["cpu" if s.cpu else "cuda"]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the patch embedding's Conv3d
    with tempfile.TemporaryDirectory() as tmp:
        got = run_golden(make_tiny_corpus(Path(tmp) / "corpus"), Path(tmp) / "run", s.device.type)
    ok, worst, msg = compare_losses(got["losses"], want["losses"], tol["first_step_rtol"], tol["rtol"])
    rec.update(got, recorded_with=want["torch"], tolerance=tol, worst_rel=worst, comparison=msg, ok=ok,
               recorded_first_last=[want["losses"][0], want["losses"][-1]])
    want_backend = "gloo" if s.cpu else "nccl"
    rec["verdict"] = "pass" if ok and got["backend"] == want_backend else "FAIL"


def part_gpu_tests(s: Suite, rec: dict) -> None:
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "mark.gpu" in p.read_text(errors="replace"))
    rec["files"] = files
    timeout = max(5.0, s.deadline - time.perf_counter() - 3)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", *files]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as ex:
        out = ex.stdout.decode(errors="replace") if isinstance(ex.stdout, bytes) else (ex.stdout or "")
        rec.update(returncode=None, tail=out[-3000:])
        raise PartTimeout() from None
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}
    rec.update(returncode=rc, counts=counts, tail=out[-3000:])
    passed, failed = counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0) + counts.get(
        "errors", 0)
    if rc not in (0,) or failed:
        rec["verdict"] = "FAIL"
    elif s.cpu:
        rec["verdict"] = f"pass (no CUDA: {counts.get('skipped', 0)} skipped, as on CI)"
    else:
        rec["verdict"] = "pass" if passed and not counts.get("skipped") else "pass (some skipped: see tail)"


def part_loss_head(s: Suite, rec: dict) -> None:
    S, D, V = (256, 64, 1024) if s.cpu else (8192, 1536, 151936)
    rec.update(W.loss_head_check(s.device, S, D, V, reps=2 if s.cpu else 5))
    rec["tolerance"] = LOSS_HEAD_TOL
    ok = rec["loss_rel"] <= LOSS_HEAD_TOL["loss_rel"] and max(rec["grad_h_rel"], rec["grad_w_rel"]) <= (
        LOSS_HEAD_TOL["grad_rel"])
    rec["verdict"] = "pass" if ok else "FAIL"


def _throughput(s: Suite, rec: dict, w: W.Workload, *, compile: bool, deadline: float) -> None:
    """Build config w, time it, and fill rec: throughput, three MFUs, peak memory vs the dry run. Without
    activation checkpointing, an out-of-memory step is recorded and the config runs again with full AC."""
    try:
        _throughput_once(s, rec, w, compile=compile, deadline=deadline)
    except torch.cuda.OutOfMemoryError as ex:
        if w.ac != "none":
            raise
        rec.clear()
        rec["oom_without_ac"] = str(ex).split("\n")[0][:300]
        W.free_engine(None)
        _throughput_once(s, rec, dataclasses.replace(w, ac="full"), compile=compile, deadline=deadline)


def _throughput_once(s: Suite, rec: dict, w: W.Workload, *, compile: bool, deadline: float) -> None:
    dev = s.device
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    graphs0 = _graphs()
    backend = "aot_eager" if s.cpu else "inductor"
    e = W.build_engine(w, dev, compile=compile, compile_backend=backend, ac=w.ac)
    try:
        host = [W.synth_microbatch(e.mcfg, w, seed=i) for i in range(3)]
        rec["activation_checkpoint"] = w.ac
        from model.attention import resolve_backend

        rec.update(params=e.n_params, build_s=round(e.build_s, 2), fused_adamw=e.fused_adamw,
                   compile=(backend if compile else False), trainable=e.trainable,
                   attn_backend=resolve_backend(e.mcfg.attn_backend, dev, torch.bfloat16),
                   microbatch={"tokens": host[0].num_tokens, "patches": host[0].num_patches,
                               "samples": len(host[0].cu_seqlens) - 1, "supervised": host[0].num_supervised})
        W.timed_steps(e, host, warmup=3 if compile else 2, max_steps=3 if s.cpu else 10, deadline=deadline,
                      record=rec)
        peak = s.report["parts"]["env"].get("peak_bf16_tflops")
        if peak and "tflops_per_s" in rec:
            rec.update(mfu=round(rec["tflops_per_s"] / peak, 4),
                       mfu_dense_attn=round(rec["tflops_dense_per_s"] / peak, 4),
                       mfu_llm_only=round(rec["tflops_llm_per_s"] / peak, 4))
        if compile:
            rec["compiled_graphs"] = _graphs() - graphs0
        rec["peak_gb"] = W.peak_memory(dev)
        errs: list[str] = []
        est = W.run_with(lambda: W.dry_run_estimate(w, dev, host[0], w.ac), errs)
        rec["dry_run_gb"] = est
        if est and rec["peak_gb"]:
            rec["peak_over_estimate"] = round(rec["peak_gb"] / est, 3)
        if errs:
            rec["errors"] = errs
    finally:
        W.free_engine(e)
        del e
        if dev.type == "cuda":
            rec["allocated_after_free_gb"] = round(torch.cuda.memory_allocated(dev) / 1e9, 3)


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def _config_part(key: str, compile_modes: tuple[bool, ...]) -> Callable[[Suite, dict], None]:
    def part(s: Suite, rec: dict) -> None:
        w = W.workloads(s.cpu)[key]
        rec["config"] = W.describe(w)
        start, end = time.perf_counter(), s.deadline
        modes = compile_modes
        if s.cpu and key != "a":
            # --cpu compiles config (a) only: the compiled path is the same code for every config, and CPU
            # compilation costs seconds per graph (a GPU run compiles every config).
            modes = tuple(m for m in compile_modes if not m)
            rec["compiled"] = {"skipped": "--cpu compiles config (a) only (a_compiled)"}
        for i, mode in enumerate(modes):
            # Each mode gets an equal slice of what is left of the share, and stops timing when it is spent.
            sub_deadline = time.perf_counter() + (end - time.perf_counter()) / (len(modes) - i)
            sub = rec.setdefault("compiled" if mode else "eager", {})
            try:
                _throughput(s, sub, w, compile=mode, deadline=sub_deadline - 2)
            except PartTimeout:
                raise
            except Exception as ex:  # noqa: BLE001 - record and go on to the other mode
                sub["error"] = f"{type(ex).__name__}: {ex}"[:2000]
                sub["traceback"] = traceback.format_exc()[-3000:]
        rec["seconds_used"] = round(time.perf_counter() - start, 1)
        if any("error" in rec.get(m, {}) for m in ("eager", "compiled")):
            rec["verdict"] = "error in a mode (see its record)"

    return part


def part_a_profile(s: Suite, rec: dict) -> None:
    w = W.workloads(s.cpu)["a"]
    e = W.build_engine(w, s.device)
    try:
        host = [W.synth_microbatch(e.mcfg, w, seed=i) for i in range(2)]
        for mb in host:  # warm up (allocator, cuBLAS handles, first-call overheads)
            W.train_step(e, mb)
        W.sync(s.device)
        rec["split_ms"] = [W.step_split(e, host[i % 2]) for i in range(2)][-1]
        errs: list[str] = []
        rec["kernels"] = W.run_with(lambda: W.top_kernels(e, host[0]), errs)
        rec["syncs"] = W.run_with(lambda: W.count_syncs(e, host[1]), errs)
        rec["precision"] = W.run_with(lambda: W.precision_check(e, host[0]), errs)
        if errs:
            rec["errors"] = errs
    finally:
        W.free_engine(e)


def part_ac_limits(s: Suite, rec: dict) -> None:
    w = W.workloads(s.cpu)["a"]
    sizes = [256, 512, 1024, 2048] if s.cpu else [8192, 16384, 32768, 65536, 131072]
    policies = ("none", "selective", "full")
    for i, ac in enumerate(policies):
        sub = rec.setdefault(ac, {})
        dl = time.perf_counter() + (s.deadline - time.perf_counter()) / (len(policies) - i)
        try:
            W.largest_microbatch(w, s.device, ac, sizes, dl, sub)
        except PartTimeout:
            raise
        except Exception as ex:  # noqa: BLE001
            sub["error"] = f"{type(ex).__name__}: {ex}"[:1000]
    if s.cpu:
        rec["note"] = "CPU: no device memory limit, every size runs (the code path is what is checked)"
    if any("error" in rec.get(p, {}) for p in policies):
        rec["verdict"] = "error in a policy (see its record)"


PARTS: dict[str, Callable[[Suite, dict], None]] = {
    "env": part_env, "parity": part_parity, "backends": part_backends, "golden": part_golden,
    "gpu_tests": part_gpu_tests, "loss_head": part_loss_head,
    "a_eager": _config_part("a", (False,)), "a_compiled": _config_part("a", (True,)),
    "a_profile": part_a_profile,
    "b": _config_part("b", (False, True)), "c": _config_part("c", (False, True)),
    "d": _config_part("d", (False, True)), "e": _config_part("e", (False, True)),
    "ac_limits": part_ac_limits,
}


# ------------------------------------------------------------------------------------------ markdown
def _f(x: Any, nd: int = 1, pct: bool = False) -> str:
    if x is None or x == "":
        return "-"
    if isinstance(x, float):
        if pct:
            return f"{100 * x:.{nd}f}%"
        return f"{x:.3g}" if abs(x) < 1 else f"{x:,.{nd}f}"
    return str(x)


def markdown(r: dict[str, Any]) -> str:
    m, P = r["meta"], r["parts"]
    env = P.get("env", {})
    lines = [
        f"# GPU suite report ({m.get('mode')})", "",
        f"- device: {m.get('device')}; torch {m.get('torch')}, CUDA {m.get('cuda')}, Triton {m.get('triton')}",
        f"- date: {m.get('date')}; command: `{m.get('command')}`; wall {m.get('wall_s')} s of a "
        f"{m.get('time_limit_s')} s limit",
        f"- peak dense bf16 (datasheet): {env.get('peak_bf16_tflops')} TFLOP/s; measured {env.get('matmul_n')}^3 bf16 "
        f"matmul: {env.get('matmul_bf16_tflops_measured')} TFLOP/s; attention kernels (bf16): "
        f"{env.get('backends_bf16')}",
        "", "## Parts", "", "| part | status | seconds | share |", "|---|---|---|---|",
    ]
    for name, rec in P.items():
        lines.append(f"| {name} | {rec.get('status')} | {rec.get('seconds', '-')} | {rec.get('share_s')} |")
    lines += ["", "## Throughput and MFU (one GPU, bf16 compute, fp32 master weights)", "",
              "MFU: causal-pair FLOPs of ViT + merger + LLM + head (model/flops.py); dense = L^2 attention pairs; "
              "LLM-only = decoder + head FLOPs over the same step time.", "",
              "| config | mode | tokens/s | step ms | TFLOP/s | MFU | MFU dense | MFU LLM-only | peak GB | dry-run GB "
              "| peak/est | data wait ms |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in ("a", "b", "c", "d", "e"):
        for part, mode in ((f"{key}_eager", "eager"), (f"{key}_compiled", "compiled"), (key, "eager"),
                           (key, "compiled")):
            t = P.get(part, {}).get(mode)
            if not t:
                continue
            lines.append(
                f"| {key} | {mode} | {_f(t.get('tokens_per_s'), 0)} | {_f(t.get('step_ms_median'))} | "
                f"{_f(t.get('tflops_per_s'))} | {_f(t.get('mfu'), 1, True)} | {_f(t.get('mfu_dense_attn'), 1, True)} | "
                f"{_f(t.get('mfu_llm_only'), 1, True)} | {_f(t.get('peak_gb'))} | {_f(t.get('dry_run_gb'))} | "
                f"{_f(t.get('peak_over_estimate'), 2)} | {_f(t.get('data_wait_ms_median'), 2)} |")
    prof = P.get("a_profile", {})
    if prof.get("split_ms"):
        lines += ["", "## Config (a): where one step's time goes (ms)", "",
                  "| " + " | ".join(prof["split_ms"]) + " |", "|" + "---|" * len(prof["split_ms"]),
                  "| " + " | ".join(_f(v, 2) for v in prof["split_ms"].values()) + " |"]
    if (prof.get("kernels") or {}).get("top"):
        k = prof["kernels"]
        lines += ["", f"## Config (a): top kernels ({k['unit']}, {k['total_ms']} ms in all)", "",
                  "| kernel | ms | calls | share |", "|---|---|---|---|"]
        lines += [f"| `{x['name']}` | {x['ms']} | {x['calls']} | {_f(x['share'], 1, True)} |" for x in k["top"]]
    if prof.get("syncs"):
        sy = prof["syncs"]
        lines += ["", f"## Config (a): host-device synchronizations in one step: {sy['count']} ({sy['method']})", ""]
        lines += [f"- `{x['where']}`: {x['n']}" for x in sy["sites"]]
    ac = P.get("ac_limits", {})
    if any(isinstance(v, dict) for v in ac.values()):
        lines += ["", "## Largest microbatch of config (a) per activation-checkpointing policy", "",
                  "| policy | largest tokens that ran | first OOM | peak GB at largest |", "|---|---|---|---|"]
        for pol in ("none", "selective", "full"):
            v = ac.get(pol) or {}
            ran = [t for t in v.get("tried", []) if not t.get("oom")]
            lines.append(f"| {pol} | {v.get('largest_tokens', '-')} | {v.get('first_oom_tokens', '-')} | "
                         f"{_f(ran[-1].get('peak_gb') if ran else None)} |")
    if prof.get("precision"):
        lines += ["", f"Mixed precision in one step of (a): {prof['precision']}"]
    lh = P.get("loss_head", {})
    if "loss_rel" in lh:
        lines += ["", "## Loss head (chunked fused CE), bf16 vs fp32", "",
                  f"shape {lh['shape']}: loss rel {lh['loss_rel']:.2e}, d/dh rel {lh['grad_h_rel']:.2e}, d/dW rel "
                  f"{lh['grad_w_rel']:.2e} (tolerance {lh['tolerance']}); fwd+bwd fp32 {lh['fp32_ms']} ms, bf16 "
                  f"{lh['bf16_ms']} ms"]
    g = P.get("golden", {})
    if "comparison" in g:
        lines += ["", "## Golden 30-step training vs the recorded CPU run", "",
                  f"{g['comparison']}; process group {g.get('backend')}, prefetched {g.get('prefetched_bytes')} bytes, "
                  f"fused AdamW {g.get('fused_adamw')}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main
def preimport() -> None:
    """Import what the parts use before any part's alarm is armed: an alarm that lands inside an import leaves
    a half-initialized module behind (seen: sympy), which would break every later part."""
    import contextlib
    import importlib

    for name in ("sympy", "torch._dynamo", "torch._inductor.config", "torch.distributed.fsdp", "torch.profiler",
                 "torch.nn.attention.flex_attention", "torch.utils._python_dispatch", "model.qwen2_vl", "model.loss",
                 "model.flops", "model.parity", "parallel", "train.trainer", "train.dry_run", "tiny_corpus",
                 "transformers"):
        with contextlib.suppress(Exception):  # the part that needs it records the error
            importlib.import_module(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for report.json and report.md")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on CPU (CI); same code paths")
    ap.add_argument("--time-limit", type=float, default=None, help="seconds for the whole suite (GPU 450, CPU 80)")
    ap.add_argument("--parts", nargs="+", default=None, choices=list(PARTS), help="run only these parts (env first)")
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu for the CPU mode", file=sys.stderr)
        return 2
    limit = a.time_limit or (80.0 if a.cpu else 450.0)
    if a.cpu:
        # One thread (the loader's worker processes too): tiny shapes gain nothing from more, and CI machines
        # are shared, where extra threads spin against each other.
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
    s = Suite(a.out, a.cpu, limit)
    s.report["meta"].update(
        mode="cpu" if a.cpu else "gpu", date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command="python benchmarks/gpu_suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        time_limit_s=limit, host=platform.node(),
    )
    preimport()
    names = ["env", *[n for n in (a.parts or PARTS) if n != "env"]]
    weights = CPU_WEIGHTS if a.cpu else WEIGHTS
    signal.signal(signal.SIGALRM, _alarm)
    threading.Thread(target=_watchdog, args=(s, 20.0), daemon=True).start()
    s.run({n: PARTS[n] for n in names}, weights)
    verdicts = {n: r.get("status") for n, r in s.report["parts"].items()}
    s.report["meta"]["failed_parts"] = [n for n, v in verdicts.items() if v in ("FAIL", "error")]
    s.write()
    print(f"[gpu_suite] wrote {a.out / 'report.json'} and report.md in {s.report['meta']['wall_s']} s; "
          f"failed parts: {s.report['meta']['failed_parts'] or 'none'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
