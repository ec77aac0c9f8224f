"""The attention-backend checks of the GPU suite's backends part (benchmarks/gpu_suite.py): every backend against
an fp32 per-segment SDPA reference on packed ViT and LLM shapes, forward and backward, with timings, then the whole
model on a packed image + video microbatch per backend. flex is timed with its block mask built once.

Shape legend: T = packed tokens, H = heads, Hkv = kv heads, Dh = head dim.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import suite_workloads as W
import torch

ATTN_TOL = {"fp32": 1e-5, "bf16": 2e-2}
"""Attention backends vs the fp32 reference, relative L2 error of outputs and input gradients (bf16 operands
land between 1e-3 and 1e-2; fp32 far below 1e-5)."""


def _packed_qkv(lengths: list[int], H: int, Hkv: int, Dh: int, device, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, Dh, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


def attn_shapes(cpu: bool) -> dict[str, tuple[list[int], int, int, int, bool]]:
    """{kind: (segment lengths, heads, kv heads, head dim, causal)}."""
    if cpu:
        return {"vit": ([64] * 3 + [96] * 2, 4, 4, 8, False), "llm": ([100, 37, 250, 1], 4, 2, 16, True)}
    # ViT of (a)/(d): 8 images of 32x32 patches and 4 frame pairs of 36x64; LLM of (a): 4 samples, 8192 tokens.
    return {"vit": ([1024] * 8 + [2304] * 4, 16, 16, 80, False), "llm": ([2048, 1500, 3000, 1644], 12, 2, 128, True)}


class _AttnCase:
    """One packed attention shape: bf16 (fp32 on CPU) inputs, an output gradient, and the fp32 per-segment SDPA
    reference's output and input gradients."""

    def __init__(self, lengths: list[int], H: int, Hkv: int, Dh: int, causal: bool, dev, dtype) -> None:
        from model.attention import sdpa_segment_loop

        self.lengths, self.H, self.Hkv, self.Dh, self.causal = lengths, H, Hkv, Dh, causal
        self.q, self.k, self.v, self.cu = _packed_qkv(lengths, H, Hkv, Dh, dev, dtype, seed=len(lengths))
        self.go = torch.randn(self.q.shape, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
        self.ref_in = [t.detach().float().clone().requires_grad_() for t in (self.q, self.k, self.v)]
        self.ref = sdpa_segment_loop(*self.ref_in, self.cu, causal=causal)
        self.ref.backward(self.go.float())

    def describe(self) -> dict[str, Any]:
        return {"lengths": self.lengths, "heads": [self.H, self.Hkv], "head_dim": self.Dh, "causal": self.causal}


def _kernel_case(dev: torch.device, c: _AttnCase, b: str, grad: bool, tol: float) -> dict[str, Any]:
    """Backend b on case c: output and input-gradient errors against the reference, and its median time. flex is
    timed with its block mask built once outside the timed calls (as the engine would build it once per
    microbatch, not per layer); `mask_ms` is that build."""
    from model import attention as A

    r: dict[str, Any] = {}
    try:
        qq, kk, vv = (t.detach().clone().requires_grad_(grad) for t in (c.q, c.k, c.v))
        o = A.varlen_attention(qq, kk, vv, c.cu, max(c.lengths), causal=c.causal, backend=b)
        r["out_rel"] = float((o.float() - c.ref).norm() / c.ref.norm())
        r["ok"] = r["out_rel"] <= tol
        if grad:
            o.backward(c.go)
            r["grad_rel"] = max(float((a.grad.float() - ref.grad).norm() / ref.grad.norm())
                                for a, ref in zip((qq, kk, vv), c.ref_in))
            r["ok"] &= r["grad_rel"] <= tol
        else:
            r["note"] = "forward only here"
        if b == "flex":
            run = _flex_prebuilt(dev, c, qq, kk, vv, r)
        else:
            run = lambda: A.varlen_attention(qq, kk, vv, c.cu, max(c.lengths), causal=c.causal, backend=b)
        times = []
        for _ in range(3 if dev.type == "cpu" else 10):
            qq.grad = kk.grad = vv.grad = None
            W.sync(dev)
            t = time.perf_counter()
            o = run()
            if grad:
                o.backward(c.go)
            W.sync(dev)
            times.append(time.perf_counter() - t)
        r["fwd_bwd_ms" if grad else "fwd_ms"] = round(sorted(times)[len(times) // 2] * 1e3, 3)
    except Exception as ex:  # noqa: BLE001 - a backend that fails here is a finding, not the end
        r = {"ok": None, "error": f"{type(ex).__name__}: {ex}"[:600]}
    return r


def _flex_prebuilt(dev: torch.device, c: _AttnCase, qq, kk, vv, r: dict[str, Any]) -> Callable[[], torch.Tensor]:
    """flex_attention on case c with its block mask built here, once (its build time goes to r['mask_ms']): the
    same call model.attention.flex_varlen makes, minus the mask."""
    from model import attention as A

    W.sync(dev)
    t = time.perf_counter()
    bm = A.flex_block_mask(c.cu, c.q.shape[0], c.causal)
    W.sync(dev)
    r["mask_ms"] = round((time.perf_counter() - t) * 1e3, 3)
    fn = A._flex_compiled() if dev.type == "cuda" else A._flex()[0]

    def run() -> torch.Tensor:
        o_1HTD = fn(*(t.transpose(0, 1).unsqueeze(0) for t in (qq, kk, vv)), block_mask=bm, scale=None,
                    enable_gqa=c.Hkv != c.H)
        return o_1HTD.squeeze(0).transpose(0, 1)

    return run


def _model_case(dev: torch.device, backends: list[str], dtype, tol: float) -> dict[str, Any]:
    """The whole model on a packed microbatch with images AND video, each backend against SDPA."""
    from model.vlm import VLModel

    w = W.Workload("mix", "tiny", dict(W._TINY), 2, 384, 192, (1, 8, 8), 1, video_grid=(2, 8, 8))
    mcfg = W.model_config(w)
    mb = W.synth_microbatch(mcfg, w, seed=3).to(dev)
    torch.manual_seed(0)
    model = VLModel(mcfg).to(dev, dtype)
    out: dict[str, Any] = {"microbatch": {"tokens": mb.num_tokens, "images": int(mb.image_grid_thw.shape[0]),
                                         "videos": int(mb.video_grid_thw.shape[0]), "patches": mb.num_patches}}
    hs: dict[str, Any] = {}
    with torch.no_grad():
        for b in ["sdpa", *[b for b in backends if b != "sdpa"]]:
            for mod in model.modules():
                if hasattr(mod, "backend"):
                    mod.backend = b
            try:
                hs[b] = model(**mb.model_inputs()).float()
            except Exception as ex:  # noqa: BLE001
                hs[b] = f"{type(ex).__name__}: {ex}"[:600]
    if isinstance(hs["sdpa"], str):
        raise RuntimeError(f"the SDPA reference itself failed on the packed image + video microbatch: {hs['sdpa']}")
    for b in backends:
        h = hs[b]
        if isinstance(h, str):
            out[b] = {"ok": None, "error": h}
        else:
            rel = float((h - hs["sdpa"]).norm() / hs["sdpa"].norm())
            out[b] = {"hidden_rel_vs_sdpa": rel, "ok": rel <= tol}
    return out


def backend_checks(dev: torch.device, backends: list[str]) -> dict[str, Any]:
    """Kernel cases on every shape, then the whole model, for `backends`: {'kernels': {kind: {b: r}}, 'model'}.
    bf16 on CUDA; fp32 and tiny shapes on CPU."""
    from model.attention import available_backends

    cpu = dev.type == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    tol = ATTN_TOL["fp32" if cpu else "bf16"]
    trainable = available_backends(dev, dtype)  # flex on CPU runs forward only (no CPU flex backward)
    out: dict[str, Any] = {"kernels": {}, "tolerance": tol}
    for kind, shape in attn_shapes(cpu).items():
        c = _AttnCase(*shape, dev, dtype)
        out["kernels"][kind] = {**c.describe(), **{b: _kernel_case(dev, c, b, b in trainable, tol) for b in backends}}
    out["model"] = _model_case(dev, backends, dtype, tol)
    return out
