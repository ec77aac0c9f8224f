"""benchmarks/sync_count.py: the CPU count of host-device syncs (issue 19). The counter itself is checked op by
op on an emulated device, then on one training step of the tiny recipe: none with the fused AdamW (a GPU's
default; pp = 1, so no pipeline length broadcast), exactly the skip flag's read with the foreach one, one read for
all the steps a log step resolves, and a sync added to the step is caught with its line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import sync_count as SC  # noqa: E402

DEV = SC.EMULATED_DEVICE
STEP_SYNCS: dict = {}
"""(kind, file function) -> count in one step of the tiny recipe (2 microbatches) with the fused AdamW: none. The
count before the sync-free step was 27 (the loader's host facts read back on the device, the loss head's
nonzero, the loss and norm read every step, the trainer's three all-reduces of host values on the device)."""


def _kinds(rep: SC.SyncReport) -> list[str]:
    return [e.kind for e in rep.events]


def test_each_kind_of_sync_is_counted_on_device_tensors_and_none_on_host_tensors():
    c = SC.HostSyncCounter()
    host = torch.arange(6.0)
    with c:
        d = torch.zeros(6, device=DEV) + torch.arange(6.0)  # a factory on the device, then device results
        assert c.is_device(d) and d.device == DEV and not c.is_device(host) and host.device == torch.device("cpu")
        d.sum().item(), float(d[0]), int(d[1]), bool(d[2])  # 4 item
        d.tolist(), d.numpy(), np.asarray(d)  # 3 tolist / numpy
        h = d.cpu()  # device-to-host
        assert not c.is_device(h) and h.device == torch.device("cpu")
        d.to("cpu"), d.to("cpu", non_blocking=True)  # device-to-host, the non-blocking one not counted
        host.clone().copy_(d)  # device-to-host
        d2 = host.to(DEV)  # host-to-device (pageable)
        assert c.is_device(d2) and c.is_device(torch.arange(3, device=d2.device))
        torch.tensor([1, 2], device=DEV)  # host-to-device
        d.nonzero(), d[d > 2], torch.masked_select(d, d > 2), torch.unique(d), torch.equal(d, d)  # 5 data-dependent
        d[d > 4] = 0.0  # data-dependent (boolean-mask assignment)
        reps = torch.ones(6, dtype=torch.long, device=DEV)
        torch.repeat_interleave(d, reps)  # data-dependent
        torch.repeat_interleave(d, reps, output_size=6)  # not: the size is given
        assert c.is_device(d.view(2, 3).t().reshape(6)), "views and composite results stay on the device"
        # none of these touch the device
        host.sum().item(), host.tolist(), host.nonzero(), host[host > 2], host.cpu(), torch.tensor([3])
    assert _kinds(c.report) == ["item"] * 4 + ["tolist / numpy"] * 3 + ["device-to-host"] * 3 + ["host-to-device"] * 2 \
        + ["data-dependent"] * 7, c.report.table()
    assert all(e.where.startswith("tests/benchmarks/test_sync_count.py:") for e in c.report.events)
    assert not hasattr(torch.Tensor, "__dict__") or "tolist" not in vars(torch.Tensor), "patches removed on exit"
    assert torch.arange(2).device == torch.device("cpu")


@pytest.fixture(scope="module")
def trainer():
    with SC.emulated_trainer() as t:
        yield t


@pytest.mark.timeout(300)
def test_one_step_of_the_tiny_recipe_counts_no_more_syncs_than_recorded(trainer):
    from tiny_corpus import GOLDEN_ASSET

    rep, st = SC.count_step(trainer)
    print(rep.table())
    # The emulated device changes nothing the step computes: step 2 of the golden run (SDPA's block-mask form,
    # what a GPU runs, instead of the CPU's per-segment loop: equal to float rounding).
    want = json.loads(GOLDEN_ASSET.read_text())["losses"][1]
    assert st.loss == pytest.approx(want, rel=1e-5)
    got: dict = {}
    for kind, where, n in rep.by_site():
        path, rest = where.split(":", 1)
        key = (kind, f"{path} {rest.split(' ', 1)[1]}")
        got[key] = got.get(key, 0) + n
    new = {k: n for k, n in got.items() if n > STEP_SYNCS.get(k, 0)}
    assert not new, f"syncs added to the step: {new}\n{rep.table()}"
    assert rep.count == sum(STEP_SYNCS.values()) == 0


@pytest.mark.timeout(300)
def test_an_item_added_to_the_step_is_caught_with_its_line(trainer, monkeypatch):
    base, _ = SC.count_step(trainer)
    loss_fn = trainer.engine.loss_fn

    def loss_with_a_read(*args, **kw):
        loss_sum, n = loss_fn(*args, **kw)
        loss_sum.detach().item()  # the deliberate sync
        return loss_sum, n

    monkeypatch.setattr(trainer.engine, "loss_fn", loss_with_a_read)
    rep, _ = SC.count_step(trainer)
    assert rep.count == base.count + trainer.m, (base.table(), rep.table())
    added = [e for e in rep.events if "test_sync_count.py" in e.where]
    assert len(added) == trainer.m and {e.kind for e in added} == {"item"} and "loss_with_a_read" in added[0].where


@pytest.mark.timeout(300)
def test_the_foreach_optimizer_reads_only_the_skip_flag_and_a_log_step_reads_once():
    """Without the fused kernel the skip is decided on the host: exactly one read per step, at optimizer_step.
    The steps between two log steps queue their loss / norm / skip flag; the log step reads them all at once."""
    with SC.emulated_trainer(optimizer="foreach") as t:
        rep, st = SC.count_step(t)
        assert [(e.kind, e.where.split(" ")[-1]) for e in rep.events] == [("item", "optimizer_step")], rep.table()
        pending = [st] + [SC.count_step(t)[1] for _ in range(2)]
        for p in pending:
            p.resolved = False
        counter = SC.HostSyncCounter(t.device)
        counter.mark_device(*(x for p in pending for x in (p.loss_t, p.grad_norm_t, p.nonfinite_t)))
        losses: list[float] = []
        with counter:
            t._resolve(list(pending), losses)
        assert [e.kind for e in counter.report.events] == ["tolist / numpy"], counter.report.table()
        assert all(p.resolved and not p.skipped for p in pending) and len(losses) == 3
        assert losses == [float(p.loss_t) for p in pending] and t.skipped_steps == 0
