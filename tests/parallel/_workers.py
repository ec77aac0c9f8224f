"""Worker bodies of the multi-process tests (run inside spawned ranks; see _dist.run_distributed).

layout_worker: the same global batch through one process (the plain model, no parallel code) and through a
parallel layout; asserts equal loss, equal full gradients (step 0) and equal parameters after 3 AdamW steps,
then the layout's own properties (named in spec["checks"]).
"""

from __future__ import annotations

import copy
import os
import time

import torch
import torch.distributed as dist
from _synth import global_batch, reference_step, tiny_config
from torch.distributed.tensor import DTensor, Shard

from model.loss import model_loss
from model.qwen2_vl import Qwen2VL
from parallel import ParallelConfig, init_distributed, parallelize
from parallel.tensor_parallel import pad_microbatch

GRAD_RTOL = 1e-5  # max abs diff / max abs of the reference gradient, per tensor (the criterion)
# Parameters after 3 AdamW steps (lr 1e-3): a sharding or reduction bug moves them by O(lr). Adam amplifies
# fp-level gradient differences (<= 2e-6 of the scale here, TP changes every matmul's summation order) on
# coordinates whose gradient is ~eps: an embedding row of a token seen once (|g| ~ 9e-7) moved 9.8e-6 apart
# under dp2 x tp2. 3e-5 = 3% of lr keeps a 3x margin over that and stays 30x below a real bug.
PARAM_ATOL = 3e-5


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _freeze(model: torch.nn.Module, what: str | None) -> None:
    if what == "llm":  # recipe stage 1: the LLM is frozen, ViT + merger train
        for n, p in model.named_parameters():
            if not n.startswith("visual."):
                p.requires_grad_(False)
    elif what == "vit":  # recipe stage 3: the ViT is frozen
        for n, p in model.named_parameters():
            if n.startswith("visual."):
                p.requires_grad_(False)


def _adamw(params, foreach: bool = True):
    # NOTE: eps=1e-6, not 1e-8. Adam divides each coordinate by sqrt(v) + eps; where the true gradient is ~0
    # (e.g. k_proj.bias along the slowest RoPE frequencies) the update is lr * sign(rounding noise), which
    # differs between ANY two summation orders, one process included. With eps=1e-6 such coordinates move by
    # < 1e-3 * lr, while coordinates with real gradients (>= 1e-5 here) are unaffected.
    # (foreach=False on DTensors: DTensor's first sharding propagation of a 100-tensor foreach op costs seconds.)
    return torch.optim.AdamW(params, lr=1e-3, eps=1e-6, weight_decay=0.1, foreach=foreach)


def _opt_state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.numel() > 1:
                total += (v.to_local() if isinstance(v, DTensor) else v).numel() * v.element_size()
    return total


def compare_grads(pm, ref: torch.nn.Module) -> dict[str, float]:
    """Per-tensor max|g - g_ref| / max|g_ref| over this rank's stage; frozen params must have no grad."""
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    worst = {}
    for name, p in pm.named_parameters():
        r = ref_params[name]
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
            continue
        assert p.grad is not None, f"{name} has no gradient"
        g = _full(p.grad)
        diff = (g - r.grad).abs().max().item()
        scale = r.grad.abs().max().item()
        rel = diff / scale if scale > 0 else diff
        worst[name] = rel
        assert rel <= GRAD_RTOL, f"grad {name}: max abs diff {diff:.3e} vs scale {scale:.3e} (rel {rel:.2e})"
    return worst


def compare_params(pm, ref: torch.nn.Module) -> float:
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    worst = 0.0
    for name, p in pm.named_parameters():
        diff = (_full(p.detach()) - ref_params[name].detach()).abs().max().item()
        assert diff <= PARAM_ATOL, f"param {name} after 3 steps: max abs diff {diff:.3e}"
        worst = max(worst, diff)
    return worst


def run_equivalence(spec: dict, dims, cfg: ParallelConfig, tag: str = "") -> dict:
    """Build, run 3 steps against the reference, assert equality; returns the pieces for further checks."""
    torch.manual_seed(0)
    ref = Qwen2VL(tiny_config(tie=spec.get("tie", False)))
    _freeze(ref, spec.get("freeze"))
    if spec.get("meta"):
        # The trainer's big-model path: build on meta, parallelize, allocate shards, load the weights.
        with torch.device("meta"):
            model = Qwen2VL(tiny_config(tie=spec.get("tie", False)))
        _freeze(model, spec.get("freeze"))
        pm = parallelize(model, dims, cfg)
        pm.materialize(init_weights=True)
        pm.load_state_dict(ref.state_dict())
    else:
        model = copy.deepcopy(ref)
        pm = parallelize(model, dims, cfg)
    opt = _adamw([p for p in pm.parameters() if p.requires_grad], foreach=False)
    ref_opt = _adamw([p for p in ref.parameters() if p.requires_grad])
    m = cfg.num_microbatches
    out = {"losses": [], "ref_losses": [], "schedules": [], "lengths": [], "kinds": []}
    for step in range(3):
        gb = global_batch(step, dims.dp * m)
        ref_loss = reference_step(ref, gb)
        mine = gb[dims.dp_rank * m : (dims.dp_rank + 1) * m] if dims.is_first_stage else None
        res = pm.step(mine)
        assert res.num_supervised == sum(mb.num_supervised for mb in gb)
        assert res.num_tokens == sum(mb.num_tokens for mb in gb)
        assert abs(res.loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (step, res.loss, ref_loss)
        out["losses"].append(res.loss)
        out["ref_losses"].append(ref_loss)
        out["schedules"].append(res.schedule)
        out["lengths"].append([mb.num_tokens for mb in gb[dims.dp_rank * m : (dims.dp_rank + 1) * m]])
        out["kinds"].append(["vision" if mb.num_patches else "text" for mb in mine or []])
        if step == 0:
            # (Only before any update: later, the two trajectories' parameters differ at fp level, see
            # PARAM_ATOL, and so do their gradients.)
            out["grad_rel"] = max(compare_grads(pm, ref).values(), default=0.0)
            pm.clip_grad_norm_(0.0)  # norm only; checked against the reference below
            out["norm"] = float(pm.clip_grad_norm_(-1.0))
            ref_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None])
            ).item()
            assert abs(out["norm"] - ref_norm) <= 1e-5 * ref_norm, (out["norm"], ref_norm)
        opt.step()
        ref_opt.step()
        if step == 0:
            out["opt_bytes"], out["ref_opt_bytes"] = _opt_state_bytes(opt), _opt_state_bytes(ref_opt)
            frozen = {id(p) for p in pm.parameters() if not p.requires_grad}
            assert not any(id(p) in frozen for p in opt.state), "frozen parameters got optimizer state"
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    out["param_diff"] = compare_params(pm, ref)
    out.update(pm=pm, ref=ref, opt=opt)
    return out


# ------------------------------------------------------------------------------------------ checks
def check_zero1_bytes(res: dict, dims) -> dict:
    """Optimizer-state bytes on this rank ~ one-process total / dp (within 10%)."""
    ideal = res["ref_opt_bytes"] / dims.dp
    ratio = res["opt_bytes"] / ideal
    assert abs(ratio - 1.0) <= 0.10, f"optimizer state {res['opt_bytes']} B vs ideal {ideal:.0f} B (ratio {ratio:.3f})"
    return {"opt_bytes": res["opt_bytes"], "ref_opt_bytes": res["ref_opt_bytes"], "ratio": ratio}


def check_zero1_comm(dims, cfg) -> dict:
    """ZeRO-1 semantics: one parameter all-gather and one gradient reduce-scatter per FSDP unit per STEP,
    however many microbatches (counted at the c10d calls FSDP2 makes)."""
    import dataclasses

    counts = {"all_gather": 0, "reduce_scatter": 0}
    # FSDP2 calls dist.all_gather_single / reduce_scatter_single (torch >= 2.12) or the *_tensor names.
    names = {"all_gather": [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)],
             "reduce_scatter": [n for n in ("reduce_scatter_single", "reduce_scatter_tensor") if hasattr(dist, n)]}
    originals = {n: getattr(dist, n) for ns in names.values() for n in ns}

    def counting(kind, fn):
        def wrapper(*a, **k):
            counts[kind] += 1
            return fn(*a, **k)

        return wrapper

    out = {}
    torch.manual_seed(0)
    for m in (1, 4):
        pm = parallelize(Qwen2VL(tiny_config()), dims, dataclasses.replace(cfg, num_microbatches=m))
        gb = global_batch(3, dims.dp * m)
        pm.step(gb[dims.dp_rank * m : (dims.dp_rank + 1) * m])  # lazy init outside the count
        for kind, ns in names.items():
            for n in ns:
                setattr(dist, n, counting(kind, originals[n]))
        try:
            counts.update(all_gather=0, reduce_scatter=0)
            pm.step(gb[dims.dp_rank * m : (dims.dp_rank + 1) * m])
            out[m] = dict(counts)
        finally:
            for n, fn in originals.items():
                setattr(dist, n, fn)
    units = 2 + 4 + 1  # ViT blocks, decoder layers, root
    assert out[1] == out[4] == {"all_gather": units, "reduce_scatter": units}, out
    return out


def check_tp_layout(res: dict, dims, cfg) -> dict:
    """Projections sharded over tp, merger/patch-embed replicated, SP activations sequence-sharded."""
    pm = res["pm"]
    params = dict(pm.named_parameters())
    tp = dims.tp

    def tp_placement(p):
        names = p.device_mesh.mesh_dim_names
        return p.placements[names.index("tp")] if "tp" in names else None

    for name in ["visual.blocks.0.attn.q_proj.weight", "visual.blocks.1.mlp.fc1.weight",
                 "layers.0.self_attn.q_proj.weight", "layers.3.self_attn.k_proj.weight",
                 "layers.1.mlp.gate_proj.weight", "embed_tokens.weight"]:
        if name in params:
            assert tp_placement(params[name]) == Shard(0), f"{name} should be Shard(0) over tp"
    for name in ["visual.blocks.0.attn.o_proj.weight", "layers.2.mlp.down_proj.weight"]:
        if name in params:
            assert tp_placement(params[name]) == Shard(1), f"{name} should be Shard(1) over tp"
    if "lm_head.weight" in params:
        assert tp_placement(params["lm_head.weight"]) == Shard(0), "vocab-parallel head should be Shard(0)"
    for name, p in params.items():
        if name.startswith("visual.merger") or name.startswith("visual.patch_embed"):
            assert tp_placement(p) is None or tp_placement(p).is_replicate(), f"{name} must be replicated over tp"
    # SP: activations between blocks hold T/tp (N/tp) rows on each rank (checked on a whole model, pp = 1;
    # with pp > 1 check_pipeline asserts the inter-stage buffers hold T/tp rows).
    seen = {}
    module = pm.module
    if dims.pp == 1:
        hooks = [
            module.visual.blocks["1"].register_forward_pre_hook(
                lambda m, a: seen.__setitem__("vit_block1_rows", a[0].shape[0])),
            module.layers["1"].register_forward_pre_hook(lambda m, a: seen.__setitem__("layer_rows", a[0].shape[0])),
        ]
        gb = global_batch(5, dims.dp * cfg.num_microbatches)
        mb = gb[dims.dp_rank * cfg.num_microbatches]
        assert mb.num_patches > 0, "the SP row check needs a microbatch with an image"
        mb = pad_microbatch(mb, tp) if cfg.sequence_parallel else mb
        with torch.no_grad():
            module(**mb.model_inputs())
        for h in hooks:
            h.remove()
        pm.reshard()  # the forward above left the ZeRO-1 units unsharded
        assert seen["layer_rows"] == mb.num_tokens // tp, (seen, mb.num_tokens)
        assert seen["vit_block1_rows"] == mb.num_patches // tp, (seen, mb.num_patches)
    # The replicated-weights debug check passes, and catches a perturbed replica.
    pm.check_replicated()
    w = params["visual.merger.mlp.0.weight"] if "visual.merger.mlp.0.weight" in params else params["norm.weight"]
    local = w.to_local() if isinstance(w, DTensor) else w
    saved = local.detach().clone()
    if dims.tp_rank == 1:
        with torch.no_grad():
            local.view(-1)[0] += 1e-6
    try:
        pm.check_replicated()
        raise AssertionError("check_replicated missed a perturbed replica")
    except RuntimeError as e:
        assert "diverged" in str(e)
    with torch.no_grad():
        local.copy_(saved)
    return {"sp_rows": seen}


def check_pipeline(res: dict, dims, cfg) -> dict:
    """Receive buffers have each microbatch's true length; lengths change per step; 1F1B order."""
    shapes = []
    sp = cfg.sequence_parallel and dims.tp > 1
    # Stage 0 knows the true lengths; the other stages get them over the pipeline group to compare.
    for step, stats in enumerate(res["schedules"]):
        lengths = torch.tensor(res["lengths"][step] if dims.is_first_stage else [0] * cfg.num_microbatches)
        dist.broadcast(lengths, src=dims.stage_rank(0), group=dims.get_group("pp"))
        true = [int(t) + (-int(t)) % dims.tp if sp else int(t) for t in lengths]
        expect_rows = [t // dims.tp if sp else t for t in true]
        fwd = {i: s for d, i, s in stats.recv_shapes if d == "fwd"}
        bwd = {i: s for d, i, s in stats.recv_shapes if d == "bwd"}
        if not dims.is_first_stage:
            assert sorted(fwd) == list(range(cfg.num_microbatches))
            for i, s in fwd.items():
                assert s == (expect_rows[i], 64), f"step {step} mb {i}: fwd buffer {s}, true rows {expect_rows[i]}"
        if not dims.is_last_stage:
            for i, s in bwd.items():
                assert s == (expect_rows[i], 64), f"step {step} mb {i}: bwd buffer {s}, true rows {expect_rows[i]}"
        shapes.append(true)
        # 1F1B: stage s runs min(p - s - 1, m) forwards before its first backward.
        first_b = [k for k, (kind, _) in enumerate(stats.order) if kind == "B"][0]
        assert first_b == min(dims.pp - dims.pp_rank - 1, cfg.num_microbatches) + 1, stats.order
    assert shapes[0] != shapes[1] != shapes[2], f"lengths should change from step to step: {shapes}"
    if dims.is_first_stage:
        # Text-only and vision microbatches alternate within the steps this stage ran.
        flat = [k for step_kinds in res["kinds"] for k in step_kinds]
        assert any(a != b for a, b in zip(flat, flat[1:])) and {"text", "vision"} <= set(flat), res["kinds"]
    return {"lengths": shapes}


def check_dcp_roundtrip(res: dict, dims, cfg, tmpdir: str) -> dict:
    """Save with DCP in this layout, read it back in one process and into a fresh parallel model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    pm, ref = res["pm"], res["ref"]
    ckpt = os.path.join(tmpdir, "dcp")
    dcp.save(pm.state_dict(), checkpoint_id=ckpt)
    dist.barrier()
    full_path = os.path.join(tmpdir, f"full_{dist.get_rank()}.pt")
    dcp_to_torch_save(ckpt, full_path)
    full = torch.load(full_path, weights_only=True)
    ref_sd = ref.state_dict()
    own = set(pm.state_dict())
    for k in own:
        assert (full[k] - ref_sd[k]).abs().max().item() <= PARAM_ATOL, k
    # Load the single-process state dict into a freshly built parallel model (another init seed).
    torch.manual_seed(123)
    other = parallelize(Qwen2VL(tiny_config(tie=False)), dims, cfg)
    other.load_state_dict(full)
    for name, p in other.named_parameters():
        assert torch.equal(_full(p.detach()), full[name]), name
    # And DCP straight into the sharded state dict of a fresh model.
    torch.manual_seed(321)
    third = parallelize(Qwen2VL(tiny_config(tie=False)), dims, cfg)
    sd = third.state_dict()
    dcp.load(sd, checkpoint_id=ckpt)
    third.load_state_dict(sd)
    for name, p in third.named_parameters():
        assert torch.equal(_full(p.detach()), full[name]), name
    return {"dcp_keys": len(own)}


def check_bf16_smoke(dims, cfg) -> dict:
    """bf16 compute through the same layout (P2P buffers, SP, vocab-parallel loss in bf16): runs, and the loss
    stays within 2% of the fp32 one-process loss (bf16 is not expected to be bitwise equal)."""
    import dataclasses

    torch.manual_seed(0)
    ref = Qwen2VL(tiny_config())
    pm = parallelize(copy.deepcopy(ref), dims, dataclasses.replace(cfg, mixed_precision="bf16"))
    m = cfg.num_microbatches
    out = []
    for step in range(2):
        gb = global_batch(10 + step, dims.dp * m)
        with torch.no_grad():
            ref_loss = sum(float(model_loss(ref, mb.labels, **mb.model_inputs())[0]) for mb in gb) / sum(mb.num_supervised for mb in gb)
        res = pm.step(gb[dims.dp_rank * m : (dims.dp_rank + 1) * m] if dims.is_first_stage else None)
        assert abs(res.loss - ref_loss) <= 2e-2 * ref_loss, (res.loss, ref_loss)
        out.append((res.loss, ref_loss))
    return {"losses": out}


def layout_worker(rank: int, world: int, spec: dict) -> dict:
    t0 = time.perf_counter()
    cfg = ParallelConfig(**spec["parallel"])
    dims = init_distributed(cfg)
    res = run_equivalence(spec, dims, cfg)
    report = {
        "rank": rank, "loss": res["losses"], "ref_loss": res["ref_losses"], "grad_rel": res["grad_rel"],
        "param_diff": res["param_diff"], "norm": res["norm"],
    }
    for check in spec.get("checks", []):
        if check == "zero1":
            report["zero1"] = check_zero1_bytes(res, dims)
        elif check == "zero1_comm":
            report["zero1_comm"] = check_zero1_comm(dims, cfg)
        elif check == "tp":
            report["tp"] = check_tp_layout(res, dims, cfg)
        elif check == "pp":
            report["pp"] = check_pipeline(res, dims, cfg)
        elif check == "dcp":
            report["dcp"] = check_dcp_roundtrip(res, dims, cfg, spec["tmpdir"])
        elif check == "bf16_smoke":
            report["bf16"] = check_bf16_smoke(dims, cfg)
        elif check.startswith("variant:"):
            # Another configuration on the same process group (frozen parts, ZeRO-3, ...).
            variant = dict(spec["variants"][check.split(":", 1)[1]])
            vcfg = ParallelConfig(**{**spec["parallel"], **variant.pop("parallel", {})})
            vres = run_equivalence({**spec, **variant}, dims, vcfg)
            report[check] = {"grad_rel": vres["grad_rel"], "param_diff": vres["param_diff"]}
            if variant.get("zero1_bytes"):
                report[check]["zero"] = check_zero1_bytes(vres, dims)
        else:
            raise ValueError(check)
    report["time_s"] = time.perf_counter() - t0
    return report


# ------------------------------------------------------------------------------------------ failures
def raising_worker(rank: int, world: int, par: dict, victim: int, where: str, timeout_s: float) -> dict:
    """One good step, then `victim` raises inside the next step (forward of microbatch 1 at `where`) and stays
    alive; every other rank must fail with an error within about timeout_s, never hang."""
    cfg = ParallelConfig(**par, timeout_s=timeout_s)
    dims = init_distributed(cfg)
    torch.manual_seed(0)
    pm = parallelize(Qwen2VL(tiny_config()), dims, cfg)
    m = cfg.num_microbatches
    gb = global_batch(0, dims.dp * m)
    mine = gb[dims.dp_rank * m : (dims.dp_rank + 1) * m] if dims.is_first_stage else None
    pm.step(mine)
    if rank == victim:
        calls = [0]

        def hook(module, args):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("injected failure inside the step")

        pm.module.get_submodule(where).register_forward_pre_hook(hook)
    t0 = time.monotonic()
    try:
        pm.step(mine)
    except Exception as e:  # noqa: BLE001 - the point is that it raises
        elapsed = time.monotonic() - t0
        if rank == victim:
            assert "injected failure" in str(e), e
            # Stay alive (and silent) so the peers can only rely on their timeouts, not on a closed socket.
            time.sleep(2.5 * timeout_s)
        return {"rank": rank, "error": f"{type(e).__name__}: {str(e)[:160]}", "elapsed": elapsed}
    raise AssertionError(f"rank {rank} finished a step that rank {victim} failed")


# ------------------------------------------------------------------------------------------ one process
def single_process_worker(rank: int, world: int) -> dict:
    """World size 1 without any launcher; activation checkpointing modes; the meta-device path; bf16."""
    import pytest

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    cfg = ParallelConfig()
    dims = init_distributed(cfg)
    assert (dims.pp, dims.dp, dims.tp, dims.world_size) == (1, 1, 1, 1)
    assert init_distributed(cfg) is dims, "init_distributed must be idempotent"
    with pytest.raises(ValueError, match="world size 1 is not divisible by pp\\*tp = 2\\*1"):
        init_distributed(ParallelConfig(pp=2))
    report = {}
    # Activation checkpointing changes memory, never the math.
    for name, ac in {
        "full": {"activation_checkpoint": "full"},
        "selective_op": {"activation_checkpoint": "selective", "ac_selective": "op"},
        "selective_block": {"activation_checkpoint": "selective", "ac_selective": "block", "ac_every": 2},
        "chunked_loss": {"loss_chunk_size": 3},
    }.items():
        res = run_equivalence({}, dims, ParallelConfig(**ac))
        report[name] = res["grad_rel"]
    # Meta device: build, parallelize, materialize, load the reference weights, then train equal to it.
    torch.manual_seed(0)
    ref = Qwen2VL(tiny_config())
    with torch.device("meta"):
        meta_model = Qwen2VL(tiny_config())
    pm = parallelize(meta_model, dims, cfg)
    pm.materialize(init_weights=False)
    pm.load_state_dict(ref.state_dict())
    gb = global_batch(1, 2)
    ref_loss = reference_step(ref, gb)
    res = pm.step(gb)
    assert abs(res.loss - ref_loss) <= 1e-6 * abs(ref_loss), (res.loss, ref_loss)
    report["meta_grad_rel"] = max(compare_grads(pm, ref).values())
    # Clipping: scales to max_norm; returns the norm without scaling when max_norm <= 0 or the norm is inf.
    norm = float(pm.clip_grad_norm_(0.0))
    clipped = float(pm.clip_grad_norm_(norm / 4))
    assert abs(clipped - norm) <= 1e-5 * norm
    after = float(pm.clip_grad_norm_(0.0))
    assert abs(after - norm / 4) <= 1e-4 * norm, (after, norm)
    g = next(p for _, p in pm.named_parameters()).grad
    _local = g.to_local() if isinstance(g, DTensor) else g
    _local.view(-1)[0] = float("inf")
    before = [p.grad.clone() for _, p in pm.named_parameters() if p.grad is not None]
    assert torch.isinf(pm.clip_grad_norm_(1.0))
    after_g = [p.grad for _, p in pm.named_parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after_g)), "a non-finite norm must not scale gradients"
    # bf16 compute with fp32 master weights and fp32 gradients.
    torch.manual_seed(0)
    ref = Qwen2VL(tiny_config())
    pm16 = parallelize(copy.deepcopy(ref), dims, ParallelConfig(mixed_precision="bf16"))
    ref_loss = reference_step(ref, gb)
    res16 = pm16.step(gb)
    assert abs(res16.loss - ref_loss) <= 2e-2 * abs(ref_loss), (res16.loss, ref_loss)
    for name, p in pm16.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([_full(p.grad).flatten() for _, p in pm16.named_parameters()]),
        torch.cat([p.grad.flatten() for _, p in ref.named_parameters()]), dim=0,
    ).item()
    assert cos > 0.99, f"bf16 gradient direction differs from fp32: cosine {cos:.4f}"
    report["bf16"] = {"loss": res16.loss, "fp32_loss": ref_loss, "grad_cosine": cos}
    return report
