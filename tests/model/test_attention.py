"""Packed attention backends against a plain per-segment softmax reference written here."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from model.attention import (
    FLEX_BLOCK,
    available_backends,
    block_mask,
    flex_block_mask,
    flex_varlen,
    resolve_backend,
    sdpa_block_mask,
    sdpa_segment_loop,
    varlen_attention,
)


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


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    """Whatever this machine has installed: a requested kernel that is missing is a ValueError naming the fix."""
    import model.attention as attention

    monkeypatch.setitem(attention._KERNELS, "flash", None)
    monkeypatch.setitem(attention._KERNELS, "torch_varlen", None)
    with pytest.raises(ValueError, match="flash_attn is not importable; install the 'gpu' extra"):
        varlen_attention(*_qkv([4]), 4, causal=True, backend="flash")
    with pytest.raises(ValueError, match=r"needs torch.nn.attention.varlen \(torch >= 2.10\)"):
        varlen_attention(*_qkv([4]), 4, causal=True, backend="torch_varlen")
    with pytest.raises(ValueError, match="attention backend 'fast'"):
        varlen_attention(*_qkv([4]), 4, causal=True, backend="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flash", "torch_varlen", "flex"])
def test_gpu_varlen_backends_match_sdpa(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")  # a gpu-marked test: deselected on CPU machines (pyproject addopts)
    if backend == "flash":
        pytest.importorskip("flash_attn", reason="flash-attn is the optional 'gpu' extra")
    # torch_varlen and flex ship with torch >= 2.10 (the project's floor): a missing one is a failure.
    assert resolve_backend(backend, torch.device("cuda"), torch.bfloat16) == backend
    # Lengths that are not multiples of flex's 128-token tiles, one shorter than a tile, GQA (4 q / 2 kv heads).
    q, k, v, cu = _qkv([100, 37, 250, 1, 300], dtype=torch.bfloat16, device="cuda")
    for causal in (True, False):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        got = varlen_attention(qq, kk, vv, cu, 300, causal=causal, backend=backend)
        qd, kd, vd = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
        want = reference(qd, kd, vd, cu.cpu(), causal)
        torch.testing.assert_close(got.double().cpu(), want.detach(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(got, sdpa_block_mask(q, k, v, cu, causal=causal), rtol=2e-2, atol=2e-2)
        g = torch.randn_like(want)
        got.backward(g.to(got.device, got.dtype))
        want.backward(g)
        for a, b in ((qq, qd), (kk, kd), (vv, vd)):
            torch.testing.assert_close(a.grad.double().cpu(), b.grad, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[23], [5, 17, 1, 9], [12, 0, 30], [130, 5, 300, 1, 129], [256, 256]],
                         ids=["one", "four", "with-empty", "across-tiles", "tile-aligned"])
def test_flex_matches_reference_on_cpu(lengths, causal):
    q, k, v, cu = _qkv(lengths)
    torch.testing.assert_close(flex_varlen(q, k, v, cu, causal=causal).double(), reference(q, k, v, cu, causal),
                               rtol=1e-5, atol=1e-5)


def _dense_blocks(num, idx, nb):
    out = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        out[i, idx[0, 0, i, : num[0, 0, i]].long()] = True
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lengths", [[130, 5, 300, 1, 129], [256, 256], [700], [1, 1, 400, 3]])
def test_flex_block_mask_tiles_are_exactly_the_touched_and_full_ones(lengths, causal):
    """Eager flex (CPU) applies the mask element-wise and ignores the tiles, so check the tiles against the
    dense mask: computed tiles = tiles with any allowed pair, full tiles = tiles where every pair is allowed."""
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    bm = flex_block_mask(cu, T, causal)
    nb = -(-T // FLEX_BLOCK)
    dense = block_mask(cu, T, causal)
    pad = torch.zeros(nb * FLEX_BLOCK, nb * FLEX_BLOCK, dtype=torch.bool)
    pad[:T, :T] = dense
    tiles = pad.view(nb, FLEX_BLOCK, nb, FLEX_BLOCK)
    any_ = tiles.any(dim=3).any(dim=1)
    valid = torch.zeros_like(pad)
    valid[:T, :T] = True
    all_ = (tiles | ~valid.view(nb, FLEX_BLOCK, nb, FLEX_BLOCK)).all(dim=3).all(dim=1) & any_
    partial = _dense_blocks(bm.kv_num_blocks, bm.kv_indices, nb)
    full = _dense_blocks(bm.full_kv_num_blocks, bm.full_kv_indices, nb)
    assert not (partial & full).any()
    assert torch.equal(partial | full, any_)
    # Full = every existing pair allowed (tiles cut by the sequence end included); causal diagonal tiles are
    # always masked (a 1-token tail tile would be all-allowed, and is computed as partial: still exact).
    assert torch.equal(full, all_ & ~torch.eye(nb, dtype=torch.bool) if causal else all_)


def test_auto_picks_a_varlen_kernel_on_cuda_and_sdpa_elsewhere():
    from model.attention import _flash_varlen, _torch_varlen

    cuda = torch.device("cuda")  # resolve_backend only reads the device type: no GPU needed
    want = "flash" if _flash_varlen() is not None else ("torch_varlen" if _torch_varlen() is not None else "sdpa")
    assert resolve_backend("auto", cuda, torch.bfloat16) == want
    assert resolve_backend("auto", cuda, torch.float32) == "sdpa"
    assert resolve_backend("auto", torch.device("cpu"), torch.bfloat16) == "sdpa"
    assert "flex" not in available_backends(torch.device("cpu"), torch.float32)
    assert "flex" in available_backends(torch.device("cpu"), torch.float32, training=False)
    with pytest.raises(ValueError, match="runs on CUDA in fp16/bf16 only"):
        resolve_backend("torch_varlen", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="attention backend 'xformers'"):
        resolve_backend("xformers", cuda, torch.bfloat16)


@pytest.mark.parametrize("params", [
    ("is_causal", "scale"), ("window_size", "scale"), ("window_size", "enable_gqa", "scale"),
], ids=["2.10", "2.11-2.12", "2.13"])
def test_torch_varlen_call_adapts_to_each_release_signature(monkeypatch, params):
    """varlen_attn changed its keywords across releases; the call is built from the signature (the GPU run
    is torch 2.11 while CI has 2.13)."""
    import model.attention as A

    seen = {}

    def fake(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        assert set(kw) <= set(params), kw
        seen.update(kw, k_heads=k.shape[1])
        return q

    monkeypatch.setattr(A, "_torch_varlen", lambda: fake)
    monkeypatch.setattr(A, "_torch_varlen_params", lambda: frozenset(params))
    q, k, v, cu = _qkv([4, 5])
    A._torch_varlen_call(q, k, v, cu, 5, True, None)
    if "window_size" in params:
        assert seen["window_size"] == (-1, 0)
    else:
        assert seen["is_causal"] is True
    # GQA: native where the release has enable_gqa, else the kv heads are repeated to the query heads.
    assert seen["k_heads"] == (2 if "enable_gqa" in params else 4)


def test_attention_paths_trace_without_graph_breaks(monkeypatch):
    """Each block is compiled as one graph (parallel/compile.py): backend resolution, the SDPA mask form, the
    flex block mask and the torch varlen call (a stand-in kernel: CI has no CUDA) must not break it."""
    import model.attention as A

    q, k, v, cu = _qkv([30, 17, 50])
    for backend in ("sdpa", "auto", "flex", "sdpa_grouped_view"):
        if backend == "sdpa_grouped_view":  # CUDA's masked SDPA: the kv heads as the batch (sdpa_heads)
            monkeypatch.setattr(A, "sdpa_takes_grouped_kv", lambda q, masked: False)
        torch._dynamo.reset()
        b = backend.removesuffix("_grouped_view")
        ex = torch._dynamo.explain(lambda q, k, v, cu, b=b: varlen_attention(q, k, v, cu, 50, causal=True,
                                                                            backend=b))(q, k, v, cu)
        assert ex.graph_break_count == 0, (backend, ex.break_reasons)
    monkeypatch.setitem(A._KERNELS, "torch_varlen", lambda q, k, v, *a, **kw: q * 1.0)
    torch._dynamo.reset()

    def cuda_path(q, k, v, cu):
        assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16) in ("flash", "torch_varlen")
        return A._torch_varlen_call(q, k, v, cu, 50, True, None)

    ex = torch._dynamo.explain(cuda_path)(q, k, v, cu)
    assert ex.graph_break_count == 0, ex.break_reasons
    torch._dynamo.reset()


def _packed_image_batch(cfg):
    from model.family import get_family
    from model.parity import SampleBuilder

    b = SampleBuilder(cfg, torch.Generator().manual_seed(0))
    samples = [b.sample(5, ("image", (1, 8, 8)), 7), b.sample(9), b.sample(3, ("image", (1, 4, 6)), 4)]
    ids = torch.cat([s.input_ids for s in samples])
    lengths = [s.input_ids.numel() for s in samples]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    grids = torch.cat([s.image_grid_thw for s in samples if s.image_grid_thw is not None])
    pos = get_family(cfg.family).processing(cfg).packed_position_ids(ids, cu, grids, None, [])
    return dict(input_ids=ids, cu_seqlens=cu, max_seqlen=max(lengths), position_ids=pos, image_grid_thw=grids,
                pixel_values=torch.cat([s.pixel_values for s in samples if s.pixel_values is not None]))


@pytest.mark.parametrize("backend", ["flex", "sdpa_mask"])
def test_masks_are_built_once_per_forward_not_per_layer(monkeypatch, backend):
    """A forward builds each distinct mask once: one for the decoder's causal segments (shared by its layers) and
    one per ViT segmentation (Qwen2.5-VL: window blocks and full blocks), not one per layer; the outputs equal a
    forward that builds the mask in every layer. sdpa_mask: the SDPA path that takes a T x T mask (accelerators),
    run on CPU here."""
    import dataclasses

    import model.attention as A
    from model.vlm import VLModel
    from tests.model.conftest import small_vocab_cfg

    cfg = small_vocab_cfg(family="qwen2_5_vl")
    cfg = dataclasses.replace(cfg, attn_backend="flex" if backend == "flex" else "sdpa")
    if backend == "sdpa_mask":  # the accelerator strategy on CPU
        monkeypatch.setattr(A, "sdpa_segment_loop", A.sdpa_block_mask)
    name = "flex_block_mask" if backend == "flex" else "block_mask"
    builds = []
    real = getattr(A, name)

    def counted(cu, total, causal, **kw):
        builds.append((total, causal))
        return real(cu, total, causal, **kw)

    monkeypatch.setattr(A, name, counted)
    torch.manual_seed(0)
    model = VLModel(cfg).eval()
    batch = _packed_image_batch(cfg)
    with torch.no_grad():
        got = model(**batch)
        per_forward = list(builds)
        monkeypatch.setattr(A, "_MASK_CACHE_SIZE", 0)  # every layer builds its own
        A._mask_cache.clear()
        builds.clear()
        want = model(**batch)
    T = batch["input_ids"].numel()
    assert [c for t, c in per_forward if t == T].count(True) == 1, per_forward
    # The ViT's two segmentations (window blocks, full blocks): one mask each, bidirectional.
    assert sorted(c for t, c in per_forward if t != T) == [False, False], per_forward
    assert len(builds) == cfg.text.num_layers + cfg.vision.depth > len(per_forward), builds
    assert torch.equal(got, want)


def test_cached_mask_is_keyed_by_the_tensor_and_its_version():
    """The same cu_seqlens tensor reuses its mask; an in-place change, another tensor (even with equal values: a
    new microbatch) or another causal flag builds again; a dead microbatch's entry goes with it."""
    import gc

    import model.attention as A

    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    m = A.cached_mask(A.block_mask, cu, 7, True)
    assert A.cached_mask(A.block_mask, cu, 7, True) is m
    assert A.cached_mask(A.block_mask, cu, 7, False) is not m
    assert A.cached_mask(A.block_mask, cu.clone(), 7, True) is not m
    cu[1] = 2
    m2 = A.cached_mask(A.block_mask, cu, 7, True)
    assert m2 is not m and torch.equal(m2, A.block_mask(cu, 7, True))
    n = len(A._mask_cache)
    del cu
    gc.collect()
    assert len(A._mask_cache) < n


class _SdpaArgs(TorchDispatchMode):
    """The key tensors SDPA's kernels receive, and the forward ops (other than views) that read the keys' storage:
    a copy of the kv heads would be one."""

    def __init__(self, key_storage: int) -> None:
        super().__init__()
        self.key_storage, self.keys, self.readers = key_storage, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name:
            self.keys.append(args[1])
        elif not func.is_view and any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr()
                                      == self.key_storage for a in args):
            self.readers.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["segment_loop", "block_mask", "cached"])
def test_gqa_grouped_view_equals_enable_gqa(monkeypatch, path):
    """Where SDPA's kernel does not take fewer kv heads (CUDA's efficient / cuDNN kernels: a mask, or fp32), the
    call runs with the kv heads as the batch and the keys expanded without a copy; outputs and gradients equal
    the enable_gqa call's (what CPU and CUDA's flash kernel run), which equals the fp64 reference."""
    import model.attention as A
    from model.text import cached_attention

    q, k, v, cu = _qkv([6, 11, 4], H=6, Hkv=2)
    if path == "cached":
        fn = lambda q, k, v: cached_attention(q[14:], k, v)  # noqa: E731 - 7 new tokens over 21 cached
    else:
        fn = partial({"segment_loop": sdpa_segment_loop, "block_mask": sdpa_block_mask}[path], cu_seqlens=cu,
                     causal=True)
    results = []
    for native in (True, False):
        monkeypatch.setattr(A, "sdpa_takes_grouped_kv", lambda q, masked, native=native: native)
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        with _SdpaArgs(kk.untyped_storage().data_ptr()) as seen:
            out = fn(qq, kk, vv)
        out.pow(2).sum().backward()
        results.append((out, qq.grad, kk.grad, vv.grad))
        for key in seen.keys:
            assert key.shape[1] == (2 if native else 3), key.shape
            # A view of the projection's own storage (zero stride over the query heads of a group): no copy.
            assert key.untyped_storage().data_ptr() == kk.untyped_storage().data_ptr()
            assert native or key.stride()[1] == 0
        assert seen.keys and not seen.readers, seen.readers
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if path != "cached":
        torch.testing.assert_close(results[1][0].double(), reference(q, k, v, cu, True), rtol=1e-5, atol=1e-5)
