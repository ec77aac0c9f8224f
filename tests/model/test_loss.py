"""The chunked, fused loss head: same loss and gradients as the naive full-logits head, and it never
materializes a [tokens x vocab] tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from core.batch import IGNORE_INDEX
from model.loss import lm_loss


def naive_lm_loss(h_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference head: full logits for every position, torch's cross-entropy (sum, and the supervised count)."""
    logits_TV = F.linear(h_TD.reshape(-1, h_TD.shape[-1]), w_VD).float()
    y_T = labels_T.reshape(-1)
    return F.cross_entropy(logits_TV, y_T, ignore_index=IGNORE_INDEX, reduction="sum"), (y_T != IGNORE_INDEX).sum()


def _inputs(T=300, D=32, V=5000, dtype=torch.float32, frac_supervised=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.2).to(dtype).requires_grad_()
    y = torch.randint(0, V, (T,), generator=g)
    y[torch.rand(T, generator=g) > frac_supervised] = IGNORE_INDEX
    return h, w, y


def _loss_and_grads(fn, h, w, y, **kw):
    h.grad = w.grad = None
    loss, n = fn(h, w, y, **kw)
    (loss / n).backward()
    return loss.detach(), n, h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk_size", [7, 37, 180, 4096])
def test_same_loss_and_grads_as_naive_fp32(chunk_size):
    h, w, y = _inputs()
    ref = _loss_and_grads(naive_lm_loss, h, w, y)
    got = _loss_and_grads(lm_loss, h, w, y, chunk_size=chunk_size)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.int64 and int(got[1]) == int((y != -100).sum())
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-7)
    assert (got[2][y == IGNORE_INDEX] == 0).all()  # unsupervised positions get no gradient


def test_bf16_within_bf16_tolerance_and_fp32_loss():
    h, w, y = _inputs(dtype=torch.bfloat16)
    ref = _loss_and_grads(naive_lm_loss, h, w, y)
    got = _loss_and_grads(lm_loss, h, w, y, chunk_size=50)
    assert got[0].dtype == torch.float32 and got[2].dtype == got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got[2].float(), ref[2].float(), rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(got[3].float(), ref[3].float(), rtol=2e-2, atol=1e-4)


def test_frozen_head_and_frozen_input_and_no_grad():
    h, w, y = _inputs()
    ref = _loss_and_grads(naive_lm_loss, h, w, y)
    w.requires_grad_(False)
    h.grad = None
    loss, n = lm_loss(h, w, y, chunk_size=64)
    (loss / n).backward()
    torch.testing.assert_close(h.grad, ref[2], rtol=1e-5, atol=1e-7)
    w.requires_grad_(True)
    w.grad = None
    h2 = h.detach()
    loss, n = lm_loss(h2, w, y, chunk_size=64)
    (loss / n).backward()
    torch.testing.assert_close(w.grad, ref[3], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        loss, _ = lm_loss(h, w, y, chunk_size=64)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref[0], rtol=1e-6, atol=1e-4)


def test_scaled_upstream_gradient():
    """backward scales the stored gradients by the incoming one (the trainer divides by a global count)."""
    h, w, y = _inputs()
    ref = _loss_and_grads(naive_lm_loss, h, w, y)
    h.grad = w.grad = None
    loss, n = lm_loss(h, w, y, chunk_size=64)
    (loss * (1.0 / n) * 0.37).backward()
    torch.testing.assert_close(h.grad, ref[2] * 0.37, rtol=1e-5, atol=1e-7)


def test_no_supervised_tokens_keeps_graph_connected():
    h, w, y = _inputs()
    y[:] = IGNORE_INDEX
    loss, n = lm_loss(h, w, y)
    assert int(n) == 0 and float(loss.detach()) == 0.0
    loss.backward()
    assert h.grad is not None and w.grad is not None and not h.grad.any() and not w.grad.any()


def test_bad_labels_and_double_backward_are_clear_errors():
    h, w, y = _inputs(V=100)
    y[3] = 100
    with pytest.raises(ValueError, match="token id 100 outside the vocabulary"):
        lm_loss(h, w, y)
    y[3] = 5
    loss, _ = lm_loss(h, w, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"^lm_loss: backward ran twice through the same fused loss head "
                                            r"\(retain_graph is not supported\); recompute the loss instead$"):
        loss.backward()


def test_shapes_edges_and_mixed_dtypes_equal_the_naive_head():
    """Batched hidden states (B, T, D), one supervised token, chunks of one row, fp32 hidden states into a bf16 head
    (cast to the head's dtype, as the matmul would need): each equals the naive head on the same inputs."""
    h, w, y = _inputs(T=60, V=300)
    ref = _loss_and_grads(naive_lm_loss, h, w, y)
    h3 = h.detach().reshape(3, 20, -1).requires_grad_()
    got = _loss_and_grads(lm_loss, h3, w, y.reshape(3, 20), chunk_size=1)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got[2].reshape(60, -1), ref[2], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[3], ref[3], rtol=1e-5, atol=1e-7)
    one = torch.full_like(y, IGNORE_INDEX)
    one[17] = 5
    loss, n = lm_loss(h, w, one)
    assert int(n) == 1
    torch.testing.assert_close(loss, F.cross_entropy((h[17] @ w.t())[None].float(), one[17:18], reduction="sum"))
    wb = w.detach().bfloat16().requires_grad_()
    hb = h.detach().bfloat16().requires_grad_()
    ref_b = _loss_and_grads(naive_lm_loss, hb, wb, y)
    got_b = _loss_and_grads(lm_loss, h, wb, y, chunk_size=16)
    assert got_b[2].dtype == torch.float32 and got_b[3].dtype == torch.bfloat16
    torch.testing.assert_close(got_b[0], ref_b[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got_b[3].float(), ref_b[3].float(), rtol=2e-2, atol=1e-3)  # bf16 rounding


def test_wrong_arguments_are_one_line_errors():
    h, w, y = _inputs(T=10, V=50)
    with pytest.raises(ValueError, match=r"^chunk_size=0 must be positive$"):
        lm_loss(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"^chunk_size=-3 must be positive$"):
        lm_loss(h, w, y, chunk_size=-3)
    with pytest.raises(ValueError, match=r"^labels have 9 positions but hidden states 10$"):
        lm_loss(h, w, y[:9])


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op (forward or backward) produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def _largest(fn, T, V, **kw):
    h, w, y = _inputs(T=T, D=16, V=V, frac_supervised=0.9)
    with LargestTensor() as mode:
        loss, n = fn(h, w, y, **kw)
        loss.backward()
    return mode.max_numel


def test_never_materializes_tokens_x_vocab():
    T, V, chunk = 1024, 2048, 64
    naive = _largest(naive_lm_loss, T, V)
    fused = _largest(lm_loss, T, V, chunk_size=chunk)
    # The check itself can fail: the naive head does build T x V tensors.
    assert naive >= T * V
    # Ours: one chunk of logits (or the V x D weight gradient) at most.
    assert fused <= max(chunk * V, V * 16), fused
    assert fused < T * V / 10


def test_autocast_bf16_matches_naive_under_autocast():
    h, w, y = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(naive_lm_loss, h, w, y)
        got = _loss_and_grads(lm_loss, h, w, y, chunk_size=64)
    assert got[2].dtype == got[3].dtype == torch.float32  # gradients in the parameters' dtype
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(got[2], ref[2], rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(got[3], ref[3], rtol=2e-2, atol=1e-4)


# ------------------------------------------------------------------------------------------ the fused chunk body
def _plain_fns():
    """The fused body's two functions run eagerly (CUDA runs them compiled: one kernel each)."""
    from model.loss import _softmax_grad, _softmax_stats

    return _softmax_stats, _softmax_grad


def _compiled_fns():
    """Traced and lowered through AOT autograd's decompositions (aot_eager: no code generation, fast on CPU)."""
    from model.loss import _softmax_grad, _softmax_stats

    torch._dynamo.reset()
    return (torch.compile(_softmax_stats, backend="aot_eager", dynamic=True, fullgraph=True),
            torch.compile(_softmax_grad, backend="aot_eager", dynamic=True, fullgraph=True))


def test_eager_body_on_cpu_fused_body_on_cuda():
    import model.loss as L

    assert L.chunk_fns(torch.device("cpu")) is None
    from torch.utils._triton import has_triton

    assert (L.chunk_fns(torch.device("cuda")) is not None) == has_triton()


@pytest.mark.parametrize("make_fns", [_plain_fns, _compiled_fns], ids=["eager", "aot_eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chunk_size", [7, 180, 4096])
def test_fused_body_equals_the_eager_body(monkeypatch, make_fns, dtype, chunk_size):
    """The GPU body (a row max, then exp-sum and softmax - onehot from the logits in their own dtype) gives the
    eager body's loss and gradients: fp32 to rounding, bf16 gradients within one bf16 step."""
    import model.loss as L

    h, w, y = _inputs(dtype=dtype)
    ref = _loss_and_grads(lm_loss, h, w, y, chunk_size=chunk_size)
    fns = make_fns()
    monkeypatch.setattr(L, "chunk_fns", lambda device: fns)
    got = _loss_and_grads(lm_loss, h, w, y, chunk_size=chunk_size)
    assert got[2].dtype == got[3].dtype == dtype
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-4)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], **tol)
    torch.testing.assert_close(got[3], ref[3], **tol)
    torch.testing.assert_close(got[0], naive_lm_loss(h, w, y)[0], rtol=1e-5, atol=1e-3)


class _ThreadGroup:
    """model.loss.VocabReduce among `n` threads, one per simulated tp rank (in-place, the same on every rank)."""

    def __init__(self, n: int) -> None:
        import threading

        self.barrier, self.slots = threading.Barrier(n), [None] * n

    def reducer(self, rank: int):
        group = self

        class _Reduce:
            def _all(self, t, fn):
                group.slots[rank] = t.clone()
                group.barrier.wait()
                out = fn(torch.stack(group.slots))
                group.barrier.wait()
                t.copy_(out)

            def max_(self, t):
                self._all(t, lambda s: s.amax(0))

            def sum_(self, t):
                self._all(t, lambda s: s.sum(0))

        return _Reduce()


@pytest.mark.parametrize("body", ["eager", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vocab_parallel_head_equals_the_whole_head(monkeypatch, body, dtype):
    """Vocab-parallel (tp = 2 ranks as threads, each holding half the head rows): every rank's loss is the whole
    head's, the hidden-state gradients sum to its gradient and the row gradients are its rows."""
    from concurrent.futures import ThreadPoolExecutor

    import model.loss as L

    tp, V = 2, 5000
    h, w, y = _inputs(dtype=dtype, V=V)
    y[:5] = torch.tensor([0, V // tp - 1, V // tp, V - 1, 17])  # targets at both shards' edges
    ref = _loss_and_grads(lm_loss, h, w, y, chunk_size=64)
    if body == "fused":
        fns = _plain_fns()
        monkeypatch.setattr(L, "chunk_fns", lambda device: fns)
    group, Vl = _ThreadGroup(tp), V // tp

    def rank(r):
        hr = h.detach().clone().requires_grad_()
        wr = w.detach()[r * Vl : (r + 1) * Vl].clone().requires_grad_()
        loss, n = lm_loss(hr, wr, y, chunk_size=64, vocab_start=r * Vl, vocab_size=V, vocab_reduce=group.reducer(r))
        (loss / n).backward()
        return loss.detach(), hr.grad, wr.grad

    with ThreadPoolExecutor(tp) as pool:
        outs = list(pool.map(rank, range(tp)))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-4)
    for loss, _, _ in outs:
        torch.testing.assert_close(loss, ref[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(sum(g.float() for _, g, _ in outs), ref[2].float(), **tol)
    torch.testing.assert_close(torch.cat([g for _, _, g in outs]), ref[3], **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_compiled_body_equals_the_eager_body(monkeypatch, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")  # a gpu-marked test: deselected on CPU machines (pyproject addopts)
    import model.loss as L

    assert L.chunk_fns(torch.device("cuda")) is not None, "no triton: the CUDA head would run the eager body"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3000, 64, generator=g).to("cuda", dtype).requires_grad_()
    w = (torch.randn(151936, 64, generator=g) * 0.2).to("cuda", dtype).requires_grad_()
    y = torch.randint(0, 151936, (3000,), generator=g).cuda()
    y[::3] = IGNORE_INDEX
    got = _loss_and_grads(lm_loss, h, w, y, chunk_size=1024)
    monkeypatch.setattr(L, "chunk_fns", lambda device: None)
    ref = _loss_and_grads(lm_loss, h, w, y, chunk_size=1024)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-3)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-5)
    torch.testing.assert_close(got[2], ref[2], **tol)
    torch.testing.assert_close(got[3], ref[3], **tol)
