"""The engine in one process without a launcher, frozen parameters that stay frozen under tensor parallelism, and
failure behaviour across processes: a rank that raises inside a step makes every other rank fail within the
configured timeout instead of hanging."""

from __future__ import annotations

import re

import pytest
from _dist import run_distributed
from _workers import frozen_tp_worker, raising_worker, shard_local_adamw_worker, single_process_worker


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_world_size_one_without_launcher_ac_meta_bf16():
    (report,) = run_distributed(single_process_worker, 1, timeout=200)
    print(report)
    for name in ("full", "selective_op", "selective_block", "chunked_loss", "meta_grad_rel"):
        assert report[name] <= 1e-5, (name, report[name])
    # bf16: recomputation must give the forward's numbers (same kernels, same order): gradients within bf16
    # rounding of the unchecked bf16 step.
    for name in ("bf16_selective_op", "bf16_full"):
        assert report[name] <= 1e-2, (name, report[name])


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_tp_keeps_frozen_parameters_frozen():
    """The trainer freezes once, before parallelize; under tp2 + SP every frozen parameter still has
    requires_grad=False afterwards (torch's SequenceParallel style re-registers the norms' parameters as new ones
    that require grad: frozen ViT norms then trained in stage 3)."""
    (report, _) = run_distributed(frozen_tp_worker, 2, timeout=150)
    assert report == {"vision": [], "vision_meta": [], "llm": [], "llm_meta": []}, report


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "world, par, victim, where",
    [
        # Stage 0 of dp replica 0 raises mid-schedule: its stage-1 peer waits on a P2P receive, its dp peer on
        # the FSDP gradient reduce-scatter.
        (4, {"dp": 2, "pp": 2, "num_microbatches": 3}, 0, "layers.0"),
        # A tp rank raises inside the ViT: its peer waits in a DTensor collective.
        (2, {"tp": 2, "num_microbatches": 2}, 1, "visual.blocks.1"),
    ],
    ids=["dp2xpp2-p2p-and-fsdp", "tp2-dtensor"],
)
def test_raising_rank_makes_peers_fail_within_timeout(world, par, victim, where):
    timeout_s = 4.0
    reports = run_distributed(raising_worker, world, par, victim, where, timeout_s, timeout=150)
    for r in reports:
        print(r)
    timed_out = rf"Timed out waiting {int(timeout_s * 1000)}ms for (send|recv) operation"  # gloo's, in ms
    for r in reports:
        if r["rank"] == victim:
            assert "injected failure" in r["error"]
            continue
        # A peer fails by its collective's timeout, or by the closed connection of a peer that timed out before
        # it and exited (the victim stays alive, so its connections stay open): never by another error, which
        # could come at once and prove nothing about the timeout. Either way it waited the timeout out: its
        # collective started at most a few seconds after the step began, and it must give up after ~timeout_s
        # (with slack for a loaded 2-core machine), never wait for the victim.
        assert re.search(rf"{timed_out}|Connection closed by peer", r["error"]), r
        assert timeout_s - 0.1 <= r["elapsed"] <= timeout_s + 12.0, r
    assert any(re.search(timed_out, r["error"]) for r in reports), reports


@pytest.mark.distributed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("world", [1, 2], ids=["dp1", "dp2"])
@pytest.mark.parametrize("impl", ["foreach", "fused"])
def test_shard_local_adamw_equals_adamw_over_dtensors(tmp_path, world, impl):
    """AdamW stepping the DTensor parameters' local tensors (train/optim.py ShardLocalAdamW): the same losses,
    parameters and checkpoint as torch's AdamW over the DTensors, no DTensor dispatch in the step, exact resume."""
    reports = run_distributed(shard_local_adamw_worker, world, str(tmp_path), impl, timeout=240)
    assert all(r["dtensor_ops_in_step"][1] == 0 < r["dtensor_ops_in_step"][0] for r in reports), reports
