"""parallel.compile: per-block torch.compile equals eager, and packed lengths that change every step do not
recompile once per length (the count is printed and bounded; the first step compiles at least one graph for each
block kind, so a model that is not compiled at all does not pass as "few graphs").

The bound: the blocks are compiled with dynamic shapes, so lengths are symbols; the traced code still
branches on whether cu_seqlens holds one segment or several (slicing a 2-element tensor specializes): two
graphs per block kind (ViT block, decoder layer). On a plain model the first ViT block's input is a view of the
patch embedding's output, which dynamo guards on (view base), so that block gets its own two (under FSDP2 the
block inputs are not views). So at most 6 graphs (plain model) or 4 (through parallelize), none after the
first few steps, however many lengths follow.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from _dist import run_distributed
from _synth import global_batch, reference_step, tiny_config

from model.loss import model_loss
from model.vlm import VLModel
from parallel import ParallelConfig
from parallel.compile import apply_compile

MAX_GRAPHS_PLAIN, MAX_GRAPHS_ENGINE = 6, 4


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"].get("unique_graphs", 0))


def _graphs_per_block_kind(model: VLModel) -> dict[str, int]:
    """Compiled graphs dynamo holds for each block kind's forward (its cache entries: one per graph and guard
    set), by class name; 0 when the kind was never compiled."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    kinds = {type(block) for _, block in model.transformer_blocks()}  # the family's compile units: ViT block, layer
    return {k.__name__: len(_debug_get_cache_entry_list(k.forward.__code__)) for k in kinds}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / (b.norm() + 1e-30))


def test_config_fields_are_strict():
    with pytest.raises(ValueError, match="compile_backend='tvm'"):
        ParallelConfig(compile=True, compile_backend="tvm").validate()
    model = VLModel(tiny_config())
    assert apply_compile(model, ParallelConfig()) == []
    names = apply_compile(model, ParallelConfig(compile=True, compile_backend="eager"))
    assert names == [n for n, _ in model.transformer_blocks()] and len(names) == 2 + 4
    # FQNs (and so checkpoints) are unchanged by compilation.
    assert all(".orig_mod" not in n and "_orig_mod" not in n for n, _ in model.named_parameters())


@pytest.mark.timeout(400)
def test_compiled_blocks_equal_eager_over_20_packed_lengths():
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = VLModel(tiny_config())
    model = copy.deepcopy(ref)
    apply_compile(model, ParallelConfig(compile=True, compile_backend="aot_eager"))
    g0 = _graphs()
    per_step, lengths = [], []
    t0 = time.perf_counter()
    for step in range(20):
        (mb,) = global_batch(step, 1)
        lengths.append(mb.num_tokens)
        for m in (ref, model):
            loss, _ = model_loss(m, mb.labels, **mb.model_inputs())
            loss.backward()
            m.loss = float(loss)
        assert abs(model.loss - ref.loss) <= 1e-5 * abs(ref.loss), (step, model.loss, ref.loss)
        got = dict(model.named_parameters())
        for n, p in ref.named_parameters():
            assert _rel(got[n].grad, p.grad) <= 1e-4, (step, n)
            p.grad = got[n].grad = None
        per_step.append(_graphs() - g0)
        if step == 0:  # both kinds (ViT block, decoder layer) compiled on the first step, not run eagerly
            per_kind = _graphs_per_block_kind(model)
            assert min(per_kind.values()) >= 1, per_kind
            assert per_step[0] >= 2, per_step
    print(f"packed lengths {lengths}: graphs compiled after each step {per_step} "
          f"({time.perf_counter() - t0:.1f} s)")
    assert len(set(lengths)) >= 15, "the lengths must actually change from step to step"
    assert per_step[-1] <= MAX_GRAPHS_PLAIN, per_step
    assert per_step[-1] == per_step[9], f"new graphs in the last 10 steps: {per_step}"


@pytest.mark.timeout(400)
def test_inductor_compiled_decoder_layer_equals_eager():
    """The real backend (C++ kernels on CPU, Triton on GPU) on one decoder layer, forward and backward."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = VLModel(tiny_config())
    layer = m.layers["0"]
    compiled = copy.deepcopy(layer)
    compiled.compile(dynamic=True)
    for T, cu in ((40, [0, 15, 40]), (57, [0, 20, 21, 57])):
        x = torch.randn(T, 64, requires_grad=True)
        rope = m.rotary(torch.arange(T).expand(3, -1), torch.float32)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        g = torch.randn(T, 64)
        outs = []
        for blk in (layer, compiled):
            x.grad = None
            y = blk(x, rope, cu_t, max(b - a for a, b in zip(cu[:-1], cu[1:])))
            y.backward(g)
            outs.append((y.detach(), x.grad.clone()))
        assert _rel(outs[1][0], outs[0][0]) <= 1e-5 and _rel(outs[1][1], outs[0][1]) <= 1e-5, T


def _engine_worker(rank: int, world: int) -> dict:
    """World size 1 through parallelize(): compile with FSDP2 and activation checkpointing equals eager."""
    from parallel import init_distributed, parallelize

    dims = init_distributed(ParallelConfig())
    out = {}
    torch._dynamo.reset()
    for ac in ("none", "full"):
        g0 = _graphs()
        torch.manual_seed(0)
        ref = VLModel(tiny_config())
        cfg = ParallelConfig(compile=True, compile_backend="aot_eager", activation_checkpoint=ac)
        pm = parallelize(copy.deepcopy(ref), dims, cfg)
        worst = 0.0
        for step in range(3):
            gb = global_batch(step, 2)
            ref_loss = reference_step(ref, gb)
            res = pm.step(gb)
            assert abs(res.loss - ref_loss) <= 1e-5 * abs(ref_loss), (ac, step, res.loss, ref_loss)
            got = dict(pm.named_parameters())
            for n, p in ref.named_parameters():
                gr = got[n].grad
                gr = gr.full_tensor() if hasattr(gr, "full_tensor") else gr
                worst = max(worst, _rel(gr, p.grad))
                p.grad = got[n].grad = None
        out[ac] = worst
        out[f"graphs_{ac}"] = _graphs() - g0
    return out


@pytest.mark.timeout(400)
def test_compile_through_the_engine_with_fsdp_and_activation_checkpointing():
    (rep,) = run_distributed(_engine_worker, 1, timeout=380)
    print(rep)
    assert rep["none"] <= 1e-4 and rep["full"] <= 1e-4, rep
    # 3 steps of 2 microbatches of distinct lengths each: one graph per block kind and segment-count case, for
    # each activation-checkpointing mode (the recompute slot wraps the block's body inside the compiled call, so
    # a checkpointed block traces graphs of its own, as many).
    assert 0 < rep["graphs_none"] <= MAX_GRAPHS_ENGINE and 0 < rep["graphs_full"] <= MAX_GRAPHS_ENGINE, rep
