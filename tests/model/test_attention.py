"""Packed attention backends against a plain per-segment softmax reference written here."""

from __future__ import annotations

import math

import pytest
import torch

from model.attention import block_mask, sdpa_block_mask, sdpa_segment_loop, varlen_attention


def reference(q, k, v, cu, causal):
    """softmax(q k^T / sqrt(d)) v per segment, kv heads repeated for GQA; fp64."""
    rep = q.shape[1] // k.shape[1]
    outs = []
    b = cu.tolist()
    for s, e in zip(b[:-1], b[1:]):
        qs = q[s:e].double().transpose(0, 1)
        ks = k[s:e].double().repeat_interleave(rep, 1).transpose(0, 1)
        vs = v[s:e].double().repeat_interleave(rep, 1).transpose(0, 1)
        a = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        if causal:
            a = a.masked_fill(torch.ones(e - s, e - s, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((a.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def _qkv(lengths, H=4, Hkv=2, Dh=16, dtype=torch.float32, device="cpu"):
    T = sum(lengths)
    g = torch.Generator().manual_seed(len(lengths))
    q, k, v = (torch.randn(T, h, Dh, generator=g).to(device, dtype) for h in (H, Hkv, Hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    return q, k, v, cu


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[23], [5, 17, 1, 9], [12, 0, 30]], ids=["one", "four", "with-empty"])
@pytest.mark.parametrize("fn", [sdpa_block_mask, sdpa_segment_loop], ids=["block_mask", "segment_loop"])
def test_sdpa_strategies_match_reference(fn, lengths, causal):
    q, k, v, cu = _qkv(lengths)
    got = fn(q, k, v, cu, causal=causal)
    torch.testing.assert_close(got.double(), reference(q, k, v, cu, causal), rtol=1e-5, atol=1e-5)


def test_sdpa_gradients_match_reference():
    q, k, v, cu = _qkv([6, 11, 4])
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    reference(qd, kd, vd, cu, True).pow(2).sum().backward()
    for fn in (sdpa_block_mask, sdpa_segment_loop):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        fn(qq, kk, vv, cu, causal=True).pow(2).sum().backward()
        for got, want in zip((qq.grad, kk.grad, vv.grad), (qd.grad, kd.grad, vd.grad)):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    out = varlen_attention(q, k, v, cu, 11, causal=True, backend="sdpa")
    torch.testing.assert_close(out.double(), reference(q, k, v, cu, True), rtol=1e-5, atol=1e-5)


def test_block_mask_never_crosses_segments():
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    m = block_mask(cu, 5, causal=True)
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]).bool()
    assert torch.equal(m, want)


def test_unavailable_backend_is_a_clear_error():
    from model.attention import _flash_varlen

    if _flash_varlen() is None:
        with pytest.raises(ValueError, match="flash_attn is not importable"):
            varlen_attention(*_qkv([4]), 4, causal=True, backend="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "torch_varlen"])
def test_gpu_varlen_backends_match_sdpa(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from model.attention import resolve_backend

    try:
        resolve_backend(backend, torch.device("cuda"), torch.bfloat16)
    except ValueError as e:
        pytest.skip(str(e))
    q, k, v, cu = _qkv([100, 37, 250, 1], dtype=torch.bfloat16, device="cuda")
    for causal in (True, False):
        got = varlen_attention(q, k, v, cu, 250, causal=causal, backend=backend)
        want = reference(q.cpu(), k.cpu(), v.cpu(), cu.cpu(), causal)
        torch.testing.assert_close(got.double().cpu(), want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got, sdpa_block_mask(q, k, v, cu, causal=causal), rtol=2e-2, atol=2e-2)
