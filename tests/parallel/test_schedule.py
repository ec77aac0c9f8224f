"""The pipeline programs (parallel/pipeline_schedule.py), without processes (the simulator: schedule_sim.py): every
rank's F and B of every (chunk, microbatch) once, matched messages, no deadlock in a rendezvous model, and the idle
share of the simulated step equal to the formulas of Narayanan et al. 2021: (p-1)/(m+p-1) for 1F1B and
(p-1)/(v*m+p-1) for interleaved 1F1B (backward = 2 x forward, zero-cost messages). The simulator itself is shown to
catch a deadlock, a mismatched message and a compute item without its input. Plus the chunk helpers of
parallel/pipeline_split.py (copy_stage, merge_stage_modules) and the schedule config checks."""

from __future__ import annotations

import pytest
import torch
from _synth import tiny_config
from schedule_sim import simulate

from model.vlm import VLModel
from parallel import ParallelConfig, stage_layer_ids
from parallel.pipeline_schedule import (
    Compute,
    Exchange,
    Msg,
    build_program,
    check_interleaved_microbatches,
    interleaved_table,
    one_f_one_b_program,
)
from parallel.pipeline_split import copy_stage, merge_stage_modules, prune_to_stage


def _programs(schedule: str, p: int, v: int, m: int, forward_only: bool = False):
    return [build_program(schedule, p, v, r, m, forward_only) for r in range(p)]


@pytest.mark.parametrize("p", [2, 3, 4])
def test_1f1b_programs_reach_the_theoretical_bubble(p):
    for m in range(1, 10):
        res = simulate(_programs("1f1b", p, 1, m), v=1)
        assert res.idle_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12), (p, m)
        # One message per microbatch and direction on every inner link.
        assert res.messages == [m * ((r > 0) + (r < p - 1)) for r in range(p)]
        simulate(_programs("1f1b", p, 1, m, forward_only=True), v=1, forward_only=True)


@pytest.mark.parametrize("p", [2, 3, 4, 5])
@pytest.mark.parametrize("v", [2, 3, 4])
def test_interleaved_programs_reach_the_theoretical_bubble(p, v):
    for m in (p, 2 * p, 3 * p, 4 * p):
        res = simulate(_programs("interleaved_1f1b", p, v, m), v=v)
        assert res.idle_fraction == pytest.approx((p - 1) / (v * m + p - 1), abs=1e-12), (p, v, m)
        # v chunks: v times the messages of 1F1B (minus virtual stage 0's gradient and the last one's output).
        assert res.messages == [2 * v * m - m * (r == 0) - m * (r == p - 1) for r in range(p)]
        simulate(_programs("interleaved_1f1b", p, v, m, forward_only=True), v=v, forward_only=True)


def test_interleaved_order_and_microbatch_rule():
    # Groups of p microbatches go through chunk 0, then chunk 1 (Megatron's table).
    assert interleaved_table(4, 2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    prog = build_program("interleaved_1f1b", 2, 2, 1, 4)
    computes = [(a.kind, a.chunk, a.mb) for a in prog if isinstance(a, Compute)]
    assert computes[:2] == [("F", 0, 0), ("F", 0, 1)] and computes[2] == ("F", 1, 0)
    for m in (1, 3, 5):
        with pytest.raises(ValueError, match=f"multiple of pp=2, got {m}"):
            build_program("interleaved_1f1b", 2, 2, 0, m)
    with pytest.raises(ValueError, match="one chunk per rank"):
        build_program("1f1b", 2, 2, 0, 4)


def test_simulator_catches_deadlock_mismatch_and_missing_input():
    # Both ranks first wait for a message the other sends only later.
    a = [Exchange((), (Msg("grad", 0, 1),)), Exchange((Msg("act", 0, 0),), ())]
    b = [Exchange((), (Msg("act", 0, 0),)), Exchange((Msg("grad", 0, 1),), ())]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate([a, b], v=1)
    # Rank 1 expects microbatch 1's activation where rank 0 sends microbatch 0's.
    with pytest.raises(RuntimeError, match="matched"):
        simulate([[Exchange((Msg("act", 0, 0),), ())], [Exchange((), (Msg("act", 1, 0),))]], v=1)
    # Rank 1's first receive removed: its first forward has no input.
    progs = [one_f_one_b_program(2, r, 2, False) for r in range(2)]
    progs[1] = progs[1][1:]
    with pytest.raises(RuntimeError, match="before receiving its input"):
        simulate(progs, v=1)


def test_copy_stage_copies_one_stage_and_merge_keeps_fqns():
    torch.manual_seed(0)
    full = VLModel(tiny_config(tie=True))
    names_before = [n for n, _ in full.named_parameters()]
    ids = stage_layer_ids(full.cfg, 4, 1)  # 4 virtual stages of one layer
    # Rank 1 of pp2 x v2 holds virtual stages 1 and 3 (the last: norm + the tied head).
    c1, c3 = copy_stage(full, 1, ids), copy_stage(full, 3, ids)
    assert [n for n, _ in full.named_parameters()] == names_before, "copy_stage changed the model"
    assert list(c1.layers) == ["1"] and c1.visual is None and c1.embed_tokens is None and c1.lm_head is None
    assert list(c3.layers) == ["3"] and c3.lm_head.weight is c3.embed_tokens.weight and c3.norm is not None
    assert c3.layers["3"].mlp.up_proj.weight is not full.layers["3"].mlp.up_proj.weight  # a copy ...
    assert torch.equal(c3.layers["3"].mlp.up_proj.weight, full.layers["3"].mlp.up_proj.weight)  # ... of it
    # A copy equals pruning the model itself.
    pruned = prune_to_stage(VLModel(tiny_config(tie=True)), 1, ids)
    assert [n for n, _ in pruned.named_parameters()] == [n for n, _ in c1.named_parameters()]
    merged = merge_stage_modules([c1, c3])
    want = {n for c in (c1, c3) for n, _ in c.named_parameters()}
    assert {n for n, _ in merged.named_parameters()} == want
    assert all(dict(merged.named_parameters())[n] is p for c in (c1, c3) for n, p in c.named_parameters())
    assert merge_stage_modules([c1]) is c1
    with pytest.raises(ValueError, match="layers.1 is in two pipeline chunks"):
        merge_stage_modules([c1, copy_stage(full, 1, ids)])


@pytest.mark.parametrize("schedule,v", [("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 3)])
def test_microbatches_in_flight_are_bounded_by_the_warmup(schedule, v):
    """What 1F1B is for (against running every forward first): rank r holds the activations of at most its
    warm-up forwards + 1 microbatch chunks, p - r for 1F1B and (v-1)p + 2(p-r-1) + 1 interleaved (Megatron's
    warm-up), whatever m. The idle share alone does not show it: extra warm-up forwards leave it unchanged."""
    for p in (2, 3, 4):
        for m in (p, 2 * p, 3 * p):
            for r in range(p):
                live = peak = 0
                for item in build_program(schedule, p, v, r, m):
                    if isinstance(item, Compute):
                        live += 1 if item.kind == "F" else -1
                        peak = max(peak, live)
                bound = p - r if v == 1 else (v - 1) * p + 2 * (p - r - 1) + 1
                assert peak == min(bound, v * m), (p, m, r, peak)


def test_program_errors_name_the_fix():
    """The executor's own checks (a step's microbatch count, the schedule's name): the interleaved count error
    suggests the nearest multiples of p."""
    for m, p, use in ((3, 2, "use 2 or 4,"), (5, 4, "use 4 or 8,"), (1, 2, "use 2,"), (7, 3, "use 6 or 9,")):
        with pytest.raises(ValueError, match=rf"multiple of pp={p}, got {m}; {use} or pp_schedule='1f1b'"):
            check_interleaved_microbatches(m, p)
    with pytest.raises(ValueError, match=r"got 0; use 2,"):
        check_interleaved_microbatches(0, 2)
    for m in (2, 4, 6):
        check_interleaved_microbatches(m, 2)
    with pytest.raises(ValueError, match=r"unknown pipeline schedule 'zb'; choose '1f1b' or 'interleaved_1f1b'"):
        build_program("zb", 2, 1, 0, 2)


def test_schedule_config_errors():
    ok = ParallelConfig.from_dict({"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2,
                                   "num_microbatches": 4})
    assert ok.pp_virtual_stages == 2
    for bad, match in [
        ({"pp": 2, "pp_virtual_stages": 2}, "needs pp_schedule='interleaved_1f1b'"),
        ({"pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2}, "needs pp >= 2 and pp_virtual_stages >= 2"),
        ({"pp": 2, "pp_schedule": "interleaved_1f1b", "num_microbatches": 2}, "pp_virtual_stages=1"),
        ({"pp": 2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2, "num_microbatches": 3},
         "num_microbatches=3 must be a multiple of pp=2.*use 2 or 4"),
        ({"pp_schedule": "zb"}, "pp_schedule"),
        ({"pp_virtual_stages": 0}, "pp_virtual_stages"),
    ]:
        with pytest.raises(ValueError, match=match):
            ParallelConfig.from_dict(bad)
