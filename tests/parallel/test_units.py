"""Single-process unit tests of the engine's pieces (no process group): config, layout validation, launcher
environments, pipeline split, SP padding and ViT row padding (checked against the unpadded model)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from _synth import global_batch, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

from model.family import get_preset
from model.loss import model_loss
from model.vlm import VLModel
from parallel import ParallelConfig, ParallelDims, resolve_launch_env, stage_layer_ids
from parallel.checkpointing import apply_activation_checkpointing
from parallel.pipeline_split import auto_first_stage_layers, prune_to_stage
from parallel.tensor_parallel import check_tp_divisibility, pad_microbatch, register_vit_row_padding


# ------------------------------------------------------------------------------------------ config
def test_config_from_dict_is_strict_and_validates():
    cfg = ParallelConfig.from_dict({"tp": 2, "pp": 2, "num_microbatches": 4, "mixed_precision": "bf16"})
    assert (cfg.tp, cfg.pp, cfg.dp, cfg.num_microbatches) == (2, 2, -1, 4)
    with pytest.raises(ValueError, match=r"unknown config key 'parallel.tensor_parallel'.*valid keys in section"):
        ParallelConfig.from_dict({"tensor_parallel": 2})
    for bad, match in [
        ({"tp": 0}, "parallel.tp=0"),
        ({"dp": 0}, "parallel.dp=0"),
        ({"zero_stage": 2}, r"parallel.zero_stage: must be one of 1 \| 3, got 2"),
        ({"mixed_precision": "fp16"}, "mixed_precision"),
        ({"activation_checkpoint": "some"}, "activation_checkpoint"),
        ({"pp_first_stage_layers": 0}, "pp_first_stage_layers"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"sp_pad_multiple": -1}, "sp_pad_multiple"),
    ]:
        with pytest.raises(ValueError, match=match):
            ParallelConfig.from_dict(bad)
    assert ParallelConfig.from_dict(cfg.to_dict()) == cfg
    assert ParallelConfig(tp=2).pad_multiple(2) == 2
    assert ParallelConfig(tp=2, sp_pad_multiple=64).pad_multiple(2) == 64
    assert ParallelConfig(tp=2, sequence_parallel=False).pad_multiple(2) == 1


def test_parallel_dims_fill_and_errors():
    assert ParallelDims(pp=2, dp=-1, tp=2, world_size=8).dp == 2
    with pytest.raises(ValueError, match=r"pp\*dp\*tp = 1\*3\*2 = 6 != world size 4.*set dp=-1"):
        ParallelDims(pp=1, dp=3, tp=2, world_size=4)
    with pytest.raises(ValueError, match="not divisible by pp\\*tp = 1\\*3"):
        ParallelDims(pp=1, dp=-1, tp=3, world_size=4)
    with pytest.raises(ValueError, match="no mesh yet"):
        ParallelDims(pp=1, dp=1, tp=1, world_size=1).get_mesh("tp")
    with pytest.raises(ValueError, match="unknown mesh dimension"):
        ParallelDims(pp=1, dp=1, tp=1, world_size=1).get_mesh("cp")


# ------------------------------------------------------------------------------------------ launchers
@pytest.mark.parametrize(
    "env, argv, expect",
    [
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
          "TORCHELASTIC_RUN_ID": "x"}, [], (3, 8, 1, "h", 29500, "torchrun")),
        # deepspeed launcher (old releases: no LOCAL_RANK, a --local_rank argument instead)
        ({"RANK": "5", "WORLD_SIZE": "16", "MASTER_ADDR": "n0", "MASTER_PORT": "29600"},
         ["train.py", "--local_rank=5"], (5, 16, 5, "n0", 29600, "deepspeed")),
        ({"RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "n0", "MASTER_PORT": "1"},
         ["train.py", "--local_rank", "2"], (2, 4, 2, "n0", 1, "deepspeed")),
        ({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
          "MASTER_ADDR": "n1", "MASTER_PORT": "2"}, [], (6, 8, 2, "n1", 2, "openmpi")),
        ({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, [], (9, 16, 1, None, None, "slurm")),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[7-8]", "SLURM_JOB_ID": "20001"}, [],
         (1, 2, 0, "n7", 20001, "slurm")),
        ({}, [], (0, 1, 0, None, None, "none")),
    ],
)
def test_resolve_launch_env(env, argv, expect):
    e = resolve_launch_env(env, argv)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == expect


# ------------------------------------------------------------------------------------------ pipeline split
def test_stage_layer_ids_explicit_auto_and_errors():
    cfg = tiny_config(layers=7)
    assert stage_layer_ids(cfg, 1, "auto") == [list(range(7))]
    assert stage_layer_ids(cfg, 3, 1) == [[0], [1, 2, 3], [4, 5, 6]]
    assert stage_layer_ids(cfg, 3, 2) == [[0, 1], [2, 3, 4], [5, 6]]  # remainder to the earlier later-stage
    with pytest.raises(ValueError, match="choose k in \\[1, 5\\]"):
        stage_layer_ids(cfg, 3, 6)
    with pytest.raises(ValueError, match="at least 9 decoder layers"):
        stage_layer_ids(cfg, 9, "auto")
    # FLOPs-derived k: the ViT's work takes layers off stage 0, more so with more vision tokens.
    big = get_preset("qwen2_vl", "7b")
    k_text = auto_first_stage_layers(big, 4, 0.0)
    k_vis = auto_first_stage_layers(big, 4, 0.5)
    assert k_text == 7 and k_vis < k_text, (k_text, k_vis)
    ids = stage_layer_ids(big, 4, "auto", 0.5)
    assert sum(map(len, ids)) == 28 and len(ids[0]) == k_vis


def test_deepstack_layers_stay_in_stage_0():
    """Qwen3-VL adds DeepStack features after decoder layers 0..k-1: those run with the ViT in stage 0, for any
    split (auto included); a stage-0 size below k is an error that says why."""
    cfg = tiny_config(family="qwen3_vl")  # DeepStack levels 2, 5 decoder layers
    assert len(stage_layer_ids(cfg, 2, "auto", 0.0)[0]) >= 2
    assert stage_layer_ids(cfg, 2, 2) == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match=r"DeepStack adds vision features after decoder layers 0\.\.1"):
        stage_layer_ids(cfg, 2, 1)
    with pytest.raises(ValueError, match="DeepStack needs its first 2 layers"):
        stage_layer_ids(cfg, 5, "auto")
    big = get_preset("qwen3_vl", "8b")
    assert len(stage_layer_ids(big, 8, "auto", 0.9)[0]) >= 3


def test_prune_to_stage_keeps_names_and_the_tied_head_as_the_embedding():
    torch.manual_seed(0)
    full = VLModel(tiny_config(tie=True))
    ids = stage_layer_ids(full.cfg, 2, 1)
    s0 = prune_to_stage(copy.deepcopy(full), 0, ids)
    s1 = prune_to_stage(copy.deepcopy(full), 1, ids)
    assert s0.lm_head is None and s0.norm is None and list(s0.layers) == ["0"]
    assert s1.visual is None and list(s1.layers) == ["1", "2", "3"]
    # The last stage of a tied model keeps the embedding as its head: the same FQN as stage 0's copy, so its
    # optimizer state and checkpoint keys are the embedding's under every layout.
    assert s1.lm_head.weight is s1.embed_tokens.weight
    assert [n for n, p in s1.named_parameters() if p is s1.lm_head.weight] == ["embed_tokens.weight"]
    names = {n for n, _ in s0.named_parameters()} | {n for n, _ in s1.named_parameters(remove_duplicate=False)}
    assert names == set(dict(full.named_parameters(remove_duplicate=False)))
    assert torch.equal(s1.lm_head.weight, full.embed_tokens.weight)
    # Untied: the last stage holds no embedding.
    untied = VLModel(tiny_config())
    assert prune_to_stage(untied, 1, stage_layer_ids(untied.cfg, 2, 1)).embed_tokens is None


def test_check_tp_divisibility_names_the_values():
    check_tp_divisibility(tiny_config(), 2)
    with pytest.raises(ValueError, match="text.num_kv_heads=2"):
        check_tp_divisibility(tiny_config(), 4)


# ------------------------------------------------------------------------------------------ padding
def test_pad_microbatch_is_a_separate_unsupervised_segment():
    torch.manual_seed(0)
    model = VLModel(tiny_config())
    for mb in global_batch(0, 3):
        padded = pad_microbatch(mb, 8)
        assert padded.num_tokens % 8 == 0 and padded.num_tokens - mb.num_tokens < 8
        assert padded.num_supervised == mb.num_supervised
        if padded is mb:
            continue
        padded.validate()
        assert padded.cu_seqlens[:-1].tolist() == mb.cu_seqlens.tolist()
        with torch.no_grad():
            a, na = model_loss(model, mb.labels, **mb.model_inputs())
            b, nb = model_loss(model, padded.labels, **padded.model_inputs())
            h_a = model(**mb.model_inputs())
            h_b = model(**padded.model_inputs())
        assert int(na) == int(nb)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        # Real tokens see exactly what they saw before: the padding attends to nothing else.
        torch.testing.assert_close(h_b[: mb.num_tokens], h_a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("multiple", [3, 8, 64])
def test_vit_row_padding_leaves_real_rows_unchanged(multiple, family):
    """The SP padding image is a segment (and Qwen2.5-VL: windows) of its own: real rows, their merged tokens and
    Qwen3-VL's DeepStack features are unchanged."""
    torch.manual_seed(0)
    model = VLModel(tiny_config(family=family))
    mb = global_batch(0, 1, family=family)[0]
    grid = mb.image_grid_thw
    ref_visual = copy.deepcopy(model.visual)
    register_vit_row_padding(model.visual, multiple)
    seen = []
    model.visual.patch_embed.register_forward_hook(lambda m, a, o: seen.append(o.shape[0]))
    with torch.no_grad():
        out = model.visual(mb.pixel_values, grid)
        ref = ref_visual(mb.pixel_values, grid)
    assert seen[0] % multiple == 0 and seen[0] >= mb.pixel_values.shape[0]
    for o, r in zip(out, ref, strict=True):  # (merged tokens, DeepStack features)
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    assert (out[1].shape[0] == 2) == (family == "qwen3_vl")


def test_activation_checkpointing_selection():
    model = VLModel(tiny_config())
    done = apply_activation_checkpointing(model, ParallelConfig(activation_checkpoint="selective",
                                                                ac_selective="block", ac_every=2))
    assert done == ["visual.blocks.0", "layers.0", "layers.2"]
    model = VLModel(tiny_config())
    done = apply_activation_checkpointing(model, ParallelConfig(activation_checkpoint="full"))
    assert len(done) == 6
    # Names are untouched (no wrapper module in the path).
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in VLModel(tiny_config()).named_parameters()}


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["none", "full", "op"])
def test_activation_checkpointing_recomputes_in_backward(mode):
    """A checkpointed block runs again in backward: the decoder's SiLU (never saved) runs twice per layer, the
    matmuls run twice under full recompute and once under per-op selective recompute (their outputs are
    saved); the gradients equal the un-checkpointed model's."""
    torch.manual_seed(0)
    ref = VLModel(tiny_config())
    model = copy.deepcopy(ref)
    ac = {"none": "none", "full": "full", "op": "selective"}[mode]
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpoint=ac, ac_selective="op"))
    mb = global_batch(0, 1)[0]
    counts = []
    for m in (ref, model):
        with _CountOps() as c:
            model_loss(m, mb.labels, **mb.model_inputs())[0].backward()
        counts.append(c.counts)
    silu, mm = torch.ops.aten.silu.default, torch.ops.aten.mm.default
    layers = tiny_config().text.num_layers
    assert counts[1][silu] - counts[0][silu] == (0 if mode == "none" else layers)
    extra_mm = counts[1].get(mm, 0) - counts[0].get(mm, 0)
    assert (extra_mm > 0) == (mode == "full"), (mode, extra_mm)
    # The attention kernel (CPU: SDPA's flash kernel) is saved by per-op selective checkpointing, not rerun.
    attn = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    extra_attn = counts[1].get(attn, 0) - counts[0].get(attn, 0)
    assert counts[0].get(attn, 0) > 0 and (extra_attn > 0) == (mode == "full"), (mode, extra_attn)
    for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=n)


def _cpu_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None, window_size=None,
                enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """A CPU kernel for torch's varlen custom op (CUDA only): the op's own outputs, computed by SDPA per segment."""
    from model.attention import sdpa_segment_loop

    out = sdpa_segment_loop(query, key, value, cu_seq_q, causal=is_causal, scale=scale)
    return out, query.new_zeros(query.shape[1], query.shape[0], dtype=torch.float), torch.zeros(2, dtype=torch.uint64)


@pytest.mark.parametrize("backend", ["sdpa", "flex", "torch_varlen"])
def test_selective_checkpointing_saves_the_op_each_attention_backend_dispatches(backend, monkeypatch):
    """Per-op selective checkpointing is asked about the op each backend really dispatches (an aten SDPA kernel,
    flex_attention's higher-order op, torch's varlen custom op, run here through a CPU kernel registered for the
    test) and answers MUST_SAVE: the attention forward is never recomputed in backward."""
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint

    import model.attention as attention
    import parallel.checkpointing as ckpt

    decided: dict = {}
    policy = ckpt._policy

    def spy(ctx, op, *args, **kwargs):
        decided[op] = policy(ctx, op, *args, **kwargs)
        return decided[op]

    monkeypatch.setattr(ckpt, "_policy", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(10, h, 8, generator=g) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    want = {"sdpa": torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
            "torch_varlen": torch.ops.torch_attn._varlen_attn.default}
    if backend == "flex":  # forward only on CPU (torch has no eager CPU flex backward)
        from torch._higher_order_ops.flex_attention import flex_attention as want_op
        fn = partial(attention.flex_varlen, causal=True)
    else:
        want_op = want[backend]
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fn = (partial(attention.sdpa_segment_loop, causal=True) if backend == "sdpa"
              else lambda *a: attention._torch_varlen_call(*a, 6, True, None))
    with torch.library._scoped_library("torch_attn", "IMPL") as lib:
        lib.impl("_varlen_attn", _cpu_varlen, "CPU")
        out = checkpoint(fn, q, k, v, cu, use_reentrant=False, context_fn=ckpt._selective_context)
    torch.testing.assert_close(out, attention.sdpa_segment_loop(q, k, v, cu, causal=True))
    assert decided.get(want_op) == CheckpointPolicy.MUST_SAVE, {str(o): d for o, d in decided.items()}


def test_save_list_resolves_absent_kernels_without_error(monkeypatch):
    """The save list names kernels by name; one this build or machine lacks (flash-attn's custom ops here unless
    installed, CUDA-only aten kernels on a CPU build) is left out instead of failing."""
    import parallel.checkpointing as ckpt

    monkeypatch.setattr(ckpt, "_CUSTOM_SAVED", (*ckpt._CUSTOM_SAVED, ("no_such_namespace", "no_such_op")))
    monkeypatch.setattr(ckpt, "_ATEN_SAVED", (*ckpt._ATEN_SAVED, "no_such_aten_op"))
    ops = ckpt._op_names()
    names = {str(o) for o in ops}
    assert {"aten.mm.default", "torch_attn._varlen_attn.default", "flex_attention"} <= names, names
    assert not any("no_such" in n for n in names)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert not any(n.startswith("flash_attn.") for n in names)
    else:
        assert "flash_attn._flash_attn_varlen_forward.default" in names


@pytest.mark.parametrize("mode", ["full", "op"])
def test_checkpointed_layers_share_one_mask(monkeypatch, mode):
    """The accelerator SDPA path (one block-diagonal mask per microbatch, model/attention.py cached_mask) under
    activation checkpointing: the recompute in backward reuses the forward's mask, and the gradients equal those
    of layers that each build their own."""
    import model.attention as attention

    monkeypatch.setattr(attention, "sdpa_segment_loop", attention.sdpa_block_mask)
    builds = []
    real = attention.block_mask

    def counted(cu, total, causal):
        builds.append(total)
        return real(cu, total, causal)

    monkeypatch.setattr(attention, "block_mask", counted)
    torch.manual_seed(0)
    model = VLModel(tiny_config())
    ac = {"full": "full", "op": "selective"}[mode]
    apply_activation_checkpointing(model, ParallelConfig(activation_checkpoint=ac, ac_selective="op"))
    mb = global_batch(0, 1)[0]
    grads, counts = [], []
    for size in (attention._MASK_CACHE_SIZE, 0):  # shared, then one per layer call
        monkeypatch.setattr(attention, "_MASK_CACHE_SIZE", size)
        attention._mask_cache.clear()
        builds.clear()
        model.zero_grad(set_to_none=True)
        model_loss(model, mb.labels, **mb.model_inputs())[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        counts.append(len(builds))
    # The decoder's packed samples: one mask for all its layers, forward and recompute; uncached, each layer
    # builds one in forward and one in its recompute.
    assert counts[0] == 1 and counts[1] == 2 * tiny_config().text.num_layers, counts
    for n, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][n], rtol=0, atol=0, msg=n)
