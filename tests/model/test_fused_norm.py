"""RMSNorm runs through F.rms_norm (one fused kernel where torch has one) and stays bitwise the unfused
Qwen2 formula: fp32 statistics, cast back to the input dtype, then the weight."""

from __future__ import annotations

import pytest
import torch

from model.text import RMSNorm


def _qwen2_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 1536, 3584])
def test_rmsnorm_equals_the_unfused_formula(dtype, dim):
    g = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim, generator=g))
    x = (3 * torch.randn(257, dim, generator=g)).to(dtype)
    assert torch.equal(norm(x), _qwen2_rmsnorm(x, norm.weight, 1e-6))
    # Gradients through the fused op agree with the formula's.
    xa, xb = x.float().requires_grad_(), x.float().requires_grad_()
    norm32 = norm.float()
    norm32(xa).square().sum().backward()
    _qwen2_rmsnorm(xb, norm32.weight.detach(), 1e-6).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
