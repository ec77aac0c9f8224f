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
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


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
