"""The vocab-parallel head + cross-entropy (parallel/vocab_parallel.py) on 2 gloo ranks equals model.loss.lm_loss on
the unsharded head in one process: the loss sum, the supervised count, the head's gradient (each rank's rows) and
the hidden states' gradient, with and without sequence parallelism, over several vocabulary chunks. (The whole
model under tp2 is compared in tests/parallel/test_layouts.py; this is the small, fast check the mutation check's
`vocab_parallel` target runs, tests/mutation.py.)"""

from __future__ import annotations

import pytest
import torch
from _dist import run_distributed

T, D, V, CHUNK = 24, 16, 40, 7  # 40 vocab rows: 20 per rank, 3 chunks of 7 on each


def _data():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(T, D, generator=g)
    w = torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (T,), generator=g)
    labels[::3] = -100  # unsupervised positions
    labels[1], labels[2] = 0, V - 1  # the first and the last vocab row, one on each rank
    return h, w, labels


def _worker(rank: int, world: int, sequence_parallel: bool) -> dict:
    from torch.distributed.tensor import Shard, distribute_tensor

    from model.loss import lm_loss
    from parallel import ParallelConfig, init_distributed
    from parallel.vocab_parallel import make_loss_fn

    dims = init_distributed(ParallelConfig(tp=2))
    mesh = dims.get_mesh("tp")
    h, w, labels = _data()
    h_ref, w_ref = h.clone().requires_grad_(), w.clone().requires_grad_()
    ref_sum, ref_n = lm_loss(h_ref, w_ref, labels, chunk_size=CHUNK)
    (2.5 * ref_sum).backward()

    w_tp = distribute_tensor(w.clone(), mesh, [Shard(0)]).requires_grad_()
    rows = slice(rank * T // 2, (rank + 1) * T // 2) if sequence_parallel else slice(None)
    h_tp = h[rows].clone().requires_grad_()
    loss_sum, n = make_loss_fn(mesh, sequence_parallel, CHUNK)(h_tp, w_tp, labels)
    (2.5 * loss_sum).backward()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    return {"loss_rel": abs(float(loss_sum) / float(ref_sum) - 1), "n": (int(n), int(ref_n)),
            "w_grad_rel": rel(w_tp.grad.to_local(), w_ref.grad[rank * V // 2 : (rank + 1) * V // 2]),
            "h_grad_rel": rel(h_tp.grad, h_ref.grad[rows])}


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sequence_parallel", [True, False], ids=["sp", "no_sp"])
def test_vocab_parallel_loss_and_grads_equal_one_process(sequence_parallel):
    reports = run_distributed(_worker, 2, sequence_parallel, timeout=150)
    for r in reports:
        assert r["n"] == (16, 16), r  # 24 positions, every third unsupervised
        assert r["loss_rel"] <= 1e-6 and r["w_grad_rel"] <= 1e-5 and r["h_grad_rel"] <= 1e-5, r
