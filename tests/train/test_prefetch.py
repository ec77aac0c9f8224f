"""train.prefetch.DevicePrefetcher: a no-op on CPU; on CUDA, pinned non-blocking copies that arrive intact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from train_synth import make_batch

from train.prefetch import DevicePrefetcher


def test_cpu_is_a_no_op():
    mbs = [make_batch(torch.Generator().manual_seed(i)) for i in range(2)]
    pf = DevicePrefetcher(torch.device("cpu"))
    assert pf.to_device(mbs) is mbs and pf.to_device(None) is None and pf.copied_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_copies_every_tensor_intact_and_the_compute_stream_sees_them():
    dev = torch.device("cuda", 0)
    mbs = [make_batch(torch.Generator().manual_seed(i), max_tokens=4096) for i in range(3)]
    pf = DevicePrefetcher(dev)
    out = pf.to_device(mbs)
    # Work queued right after, on the compute stream, must see complete copies (no synchronize in between).
    sums = [mb.input_ids.sum() + mb.pixel_values.double().sum() for mb in out]
    for host, got, s in zip(mbs, out, sums):
        for f in dataclasses.fields(host):
            a, b = getattr(host, f.name), getattr(got, f.name)
            if isinstance(a, torch.Tensor):
                assert b.device == dev and torch.equal(a, b.cpu()), f.name
            else:
                assert a == b, f.name
        assert float(s) == float(host.input_ids.sum() + host.pixel_values.double().sum())
    assert pf.copied_bytes == sum(t.numel() * t.element_size() for mb in mbs for t in mb.as_dict().values()
                                  if isinstance(t, torch.Tensor))
