"""Worker bodies of the multi-process tests (run inside spawned ranks; see _dist.run_distributed).

layout_worker: the same global batch through one process (the plain model, no parallel code) and through a
parallel layout; asserts equal loss, equal full gradients (step 0) and equal parameters after 3 AdamW steps,
then the layout's own properties (named in spec["checks"]). spec["lora"] (LoRAConfig fields) puts LoRA adapters
on both models (model/lora.py) with random B, so the adapters' gradients are not zero at step 0.
"""

from __future__ import annotations

import copy
import math
import os
import time

import torch
import torch.distributed as dist
from _synth import global_batch, reference_step, tiny_config
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from model.family import get_family
from model.lora import LoRAConfig, apply_lora, lora_modules
from model.loss import model_loss
from model.vlm import VLModel
from parallel import ParallelConfig, init_distributed, parallelize
from parallel.tensor_parallel import pad_microbatch

GRAD_RTOL = 1e-5  # max abs diff / max abs of the reference gradient, per tensor (the criterion)
# Parameters after 3 AdamW steps (lr 1e-3): a sharding or reduction bug moves them by O(lr). Adam amplifies
# fp-level gradient differences (<= 2e-6 of the scale here, TP changes every matmul's summation order) on
# coordinates whose gradient is ~eps: an embedding row of a token seen once (|g| ~ 9e-7) moved 9.8e-6 apart
# under dp2 x tp2. 3e-5 = 3% of lr keeps a 3x margin over that and stays 30x below a real bug.
PARAM_ATOL = 3e-5
# At the recipes' AdamW eps (1e-8), a coordinate whose true gradient is ~0 (below the summation-order noise of
# its gradient) moves by lr * sign(noise) each step, in any two runs, one process included: such coordinates can
# end up to 2 * lr * steps apart, and no layout can do better. Coordinates with a real gradient (|g| >= 1e-5 of
# the tensor's scale at step 0) keep the PARAM_ATOL bound, and the noise-limited ones may be at most 1% of all
# (a sharding or reduction bug moves coordinates with real gradients by O(lr), and many of them).
NOISE_GRAD_REL = 1e-5
NOISE_FRACTION = 0.01


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _freeze(model: torch.nn.Module, what: str | None) -> None:
    """Freeze a parameter group the family declares: 'llm' (recipe stage 1: ViT + merger train) or 'vision'
    (recipe stage 3: merger + LLM train)."""
    if what is None:
        return
    family = get_family(model.cfg.family)
    for n, p in model.named_parameters():
        if family.group_of(n) == what:
            p.requires_grad_(False)


def _add_lora(model: torch.nn.Module, spec: dict) -> None:
    """spec["lora"]'s adapters (frozen base, the spec's frozen group checked), then B drawn at random in name order
    (B = 0 would make every A gradient zero at step 0, and the comparison vacuous)."""
    if not spec.get("lora"):
        return
    apply_lora(model, LoRAConfig(**spec["lora"]), frozen_groups=[spec["freeze"]] if spec.get("freeze") else [])
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for _, m in sorted(lora_modules(model).items()):
            m.lora_B.weight.copy_(0.05 * torch.randn(m.lora_B.weight.shape, generator=g))


def _check_lora_materialized(pm, ref: torch.nn.Module) -> int:
    """After materialize(init_weights=True) on the meta path: every rank's slices of the adapters are those of the
    adapters built on the CPU (A drawn from its name-seeded generator, B = 0): n adapters checked."""
    want = {n: p for n, p in ref.named_parameters()}
    n = 0
    for name, p in pm.named_parameters():
        if name.endswith(".lora_A.weight"):
            assert torch.equal(_full(p.detach()), want[name]), f"{name}: materialized A differs from the CPU-built one"
            n += 1
        elif name.endswith(".lora_B.weight"):
            assert _full(p.detach()).abs().max() == 0, f"{name}: B must start at zero"
    assert n, "no adapter on this rank"
    return n


def _adamw(params, foreach: bool = True, eps: float = 1e-6):
    # NOTE: eps=1e-6, not 1e-8. Adam divides each coordinate by sqrt(v) + eps; where the true gradient is ~0
    # (e.g. k_proj.bias along the slowest RoPE frequencies) the update is lr * sign(rounding noise), which
    # differs between ANY two summation orders, one process included. With eps=1e-6 such coordinates move by
    # < 1e-3 * lr, while coordinates with real gradients (>= 1e-5 here) are unaffected.
    # (foreach=False on DTensors: DTensor's first sharding propagation of a 100-tensor foreach op costs seconds.)
    return torch.optim.AdamW(params, lr=1e-3, eps=eps, weight_decay=0.1, foreach=foreach)


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
        assert r.grad is not None, f"{name}: the parallel model computed a gradient, the one process did not"
        diff = (g - r.grad).abs().max().item()
        scale = r.grad.abs().max().item()
        rel = diff / scale if scale > 0 else diff
        worst[name] = rel
        assert rel <= GRAD_RTOL, f"grad {name}: max abs diff {diff:.3e} vs scale {scale:.3e} (rel {rel:.2e})"
    return worst


def compare_params(pm, ref: torch.nn.Module, ref_grads0: dict[str, torch.Tensor] | None = None,
                   lr: float = 1e-3, steps: int = 3) -> float:
    """Max parameter difference after the steps. With ref_grads0 (runs at the recipes' eps), coordinates whose
    step-0 gradient is below NOISE_GRAD_REL of the tensor's scale get the Adam bound 2 * lr * steps instead of
    PARAM_ATOL, and must be at most NOISE_FRACTION of the coordinates (see the constants above)."""
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    worst, noisy, total = 0.0, 0, 0
    for name, p in pm.named_parameters():
        d = (_full(p.detach()) - ref_params[name].detach()).abs()
        if ref_grads0 is not None and name in ref_grads0:
            g = ref_grads0[name].abs()
            quiet = g < NOISE_GRAD_REL * max(g.max().item(), 1e-30)
            noisy += int(quiet.sum())
            total += g.numel()
            assert d[quiet].max().item() <= 2 * lr * steps if quiet.any() else True, name
            d = d[~quiet]
        diff = d.max().item() if d.numel() else 0.0
        assert diff <= PARAM_ATOL, f"param {name} after 3 steps: max abs diff {diff:.3e}"
        worst = max(worst, diff)
    if ref_grads0 is not None:
        assert noisy <= NOISE_FRACTION * total, f"{noisy} of {total} coordinates have no real gradient"
    return worst


def run_equivalence(spec: dict, dims, cfg: ParallelConfig, tag: str = "") -> dict:
    """Build, run 3 steps against the reference, assert equality; returns the pieces for further checks."""
    family = spec.get("family", "qwen2_vl")
    torch.manual_seed(0)
    ref = VLModel(tiny_config(tie=spec.get("tie", False), family=family))
    _freeze(ref, spec.get("freeze"))
    _add_lora(ref, spec)
    if spec.get("meta"):
        # The trainer's big-model path: build on meta, parallelize, allocate shards, load the weights.
        with torch.device("meta"):
            model = VLModel(tiny_config(tie=spec.get("tie", False), family=family))
        _freeze(model, spec.get("freeze"))
        if spec.get("lora"):
            apply_lora(model, LoRAConfig(**spec["lora"]), frozen_groups=[spec["freeze"]] if spec.get("freeze") else [])
        pm = parallelize(model, dims, cfg)
        pm.materialize(init_weights=True)
        if spec.get("lora"):
            fresh = VLModel(tiny_config(tie=spec.get("tie", False), family=family))  # adapters as built on the CPU
            apply_lora(fresh, LoRAConfig(**spec["lora"]))
            out_meta = _check_lora_materialized(pm, fresh)
        pm.load_state_dict(ref.state_dict())
    else:
        model = copy.deepcopy(ref)
        pm = parallelize(model, dims, cfg)
    eps = spec.get("adam_eps", 1e-6)
    opt = _adamw([p for p in pm.parameters() if p.requires_grad], foreach=False, eps=eps)
    ref_opt = _adamw([p for p in ref.parameters() if p.requires_grad], eps=eps)
    ref_grads0: dict[str, torch.Tensor] | None = None
    m = cfg.num_microbatches
    out = {"losses": [], "ref_losses": [], "schedules": [], "lengths": [], "kinds": [], "family": family}
    if spec.get("meta") and spec.get("lora"):
        out["lora_materialized"] = out_meta
    for step in range(3):
        gb = global_batch(step, dims.dp * m, family=family)
        ref_loss = reference_step(ref, gb)
        mine = gb[dims.dp_rank * m : (dims.dp_rank + 1) * m] if dims.is_first_stage else None
        res = pm.step(mine)
        assert res.num_supervised == sum(mb.num_supervised for mb in gb)
        assert res.num_tokens == sum(mb.num_tokens for mb in gb)
        assert abs(res.loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (step, res.loss, ref_loss)
        if step == 0 and spec.get("eval"):
            # Between backward and optimizer step: the eval must leave the gradients (checked next) alone.
            out["eval"] = check_eval(pm, ref, dims, family)
        out["losses"].append(res.loss)
        out["ref_losses"].append(ref_loss)
        out["schedules"].append(res.schedule)
        out["lengths"].append([mb.num_tokens for mb in gb[dims.dp_rank * m : (dims.dp_rank + 1) * m]])
        out["kinds"].append(["vision" if mb.num_patches else "text" for mb in mine or []])
        if step == 0:
            # (Only before any update: later, the two trajectories' parameters differ at fp level, see
            # PARAM_ATOL, and so do their gradients.)
            out["grad_rel"] = max(compare_grads(pm, ref).values(), default=0.0)
            if eps < 1e-6:
                ref_grads0 = {n: p.grad.detach().clone() for n, p in ref.named_parameters(remove_duplicate=False)
                              if p.grad is not None}
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
    out["param_diff"] = compare_params(pm, ref, ref_grads0)
    out.update(pm=pm, ref=ref, opt=opt, lora=spec.get("lora") or {})
    return out


# ------------------------------------------------------------------------------------------ checks
def check_eval(pm, ref: torch.nn.Module, dims, family: str) -> list[dict]:
    """pm.evaluate equals the one-process forward loss (sum of token CE / global supervised count), with uneven
    per-dp-rank counts (3 and 1, then 2 and none: that rank passes None); it leaves the gradients as they were
    and the FSDP units resharded (ZeRO-1's forward would leave unsharded parameters registered)."""
    params = dict(pm.named_parameters())
    grads = {n: _local(p.grad).clone() for n, p in params.items() if p.grad is not None}
    out = []
    for call, counts in enumerate(([3, 1], [2, 0])):
        counts = counts if dims.dp == 2 else [sum(counts)] * dims.dp
        gb = global_batch(20 + call, sum(counts), family=family)
        start = sum(counts[: dims.dp_rank])
        mine = gb[start : start + counts[dims.dp_rank]] if dims.is_first_stage else None
        res = pm.evaluate(mine or None)
        with torch.no_grad():
            ref_sum = sum(float(model_loss(ref, mb.labels, **mb.model_inputs())[0]) for mb in gb)
        n_sup = sum(mb.num_supervised for mb in gb)
        assert (res.num_supervised, res.num_microbatches, res.num_tokens) == (
            n_sup, len(gb), sum(mb.num_tokens for mb in gb)), (res, n_sup, len(gb))
        assert abs(res.loss - ref_sum / n_sup) <= 1e-5 * ref_sum / n_sup, (call, res.loss, ref_sum / n_sup)
        assert abs(res.loss_sum - ref_sum) <= 1e-5 * ref_sum, (res.loss_sum, ref_sum)
        out.append({"loss": res.loss, "ref": ref_sum / n_sup, "counts": counts})
    for n, p in pm.named_parameters():
        assert p is params[n], f"{n}: evaluate() left an unsharded parameter registered (no reshard)"
        if n in grads:
            assert torch.equal(_local(p.grad), grads[n]), f"evaluate() changed the gradient of {n}"
        else:
            assert p.grad is None, f"evaluate() created a gradient for {n}"
    return out


def check_zero1_bytes(res: dict, dims) -> dict:
    """Optimizer-state bytes on this rank ~ one-process total / dp (within 10%)."""
    ideal = res["ref_opt_bytes"] / dims.dp
    ratio = res["opt_bytes"] / ideal
    assert abs(ratio - 1.0) <= 0.10, f"optimizer state {res['opt_bytes']} B vs ideal {ideal:.0f} B (ratio {ratio:.3f})"
    return {"opt_bytes": res["opt_bytes"], "ref_opt_bytes": res["ref_opt_bytes"], "ratio": ratio}


def check_zero1_comm(dims, cfg, family: str) -> dict:
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
        model = VLModel(tiny_config(family=family))
        units = len(model.transformer_blocks()) + 1  # ViT blocks, decoder layers, root
        pm = parallelize(model, dims, dataclasses.replace(cfg, num_microbatches=m))
        gb = global_batch(3, dims.dp * m, family=family)
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

    # The names to check come from the family's declared roles and the modules this rank holds (not from
    # `params`), so a renamed parameter is a missing key here, never a silently skipped check.
    plan = get_family(res["family"]).plan(pm.module.cfg)

    def named(roles, role):
        return [f"{path}.weight" for path, r in roles.items() if r == role]

    col_llm, row_llm = named(plan.decoder_layer, "colwise"), named(plan.decoder_layer, "rowwise")
    col_vit, row_vit = named(plan.vision_block, "colwise"), named(plan.vision_block, "rowwise")
    assert len(col_llm) == 5 and len(row_llm) == 2 and len(col_vit) >= 4 and len(row_vit) == 2, plan
    want_col: list[str] = []
    want_row: list[str] = []
    for chunk in pm.modules:
        for k in chunk.layers:
            want_col += [f"layers.{k}.{n}" for n in col_llm]
            want_row += [f"layers.{k}.{n}" for n in row_llm]
        if chunk.visual is not None:
            for b in chunk.visual.blocks:
                want_col += [f"visual.blocks.{b}.{n}" for n in col_vit]
                want_row += [f"visual.blocks.{b}.{n}" for n in row_vit]
        if chunk.embed_tokens is not None:
            want_col.append("embed_tokens.weight")  # vocab-parallel (on a tied last stage: its head)
        if chunk.lm_head is not None and chunk.lm_head.weight is not getattr(chunk.embed_tokens, "weight", None):
            want_col.append("lm_head.weight")  # vocab-parallel head
    assert want_col and want_row, "this rank holds no sharded projection"
    for name in want_col:
        assert tp_placement(params[name]) == Shard(0), f"{name} should be Shard(0) over tp"
    for name in want_row:
        assert tp_placement(params[name]) == Shard(1), f"{name} should be Shard(1) over tp"
    for name, p in params.items():
        if name.startswith(("visual.merger", "visual.patch_embed", "visual.pos_embed", "visual.deepstack")):
            assert tp_placement(p) is None or tp_placement(p).is_replicate(), f"{name} must be replicated over tp"
    # Qwen3's QK-norm weights are plain tensors (partial gradients summed over tp by the engine).
    for name in pm.tp_partial:
        assert not isinstance(params[name], DTensor) or tp_placement(params[name]) is None, name
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
        gb = global_batch(5, dims.dp * cfg.num_microbatches, family=res["family"])
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
    merger = next((n for n in params if n.startswith("visual.merger.") and n.endswith(".weight")), "norm.weight")
    w = params[merger]
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


def check_lora_layout(res: dict, dims) -> dict:
    """LoRA under TP: the adapter of a colwise projection has A replicated and B Shard(0) (like the output), of a
    rowwise one A Shard(1) (like the input) and B replicated; merger adapters are plain replicated tensors. Names
    from the family's roles and the modules held, so a missing adapter is a KeyError, never a skipped check."""
    params = dict(res["pm"].named_parameters())
    plan = get_family(res["family"]).plan(res["pm"].module.cfg)

    def tp_placement(p):
        if not isinstance(p, DTensor):
            return None
        names = p.device_mesh.mesh_dim_names
        return p.placements[names.index("tp")] if "tp" in names else None

    seen = {"colwise": 0, "rowwise": 0, "plain": 0}
    for chunk in res["pm"].modules:
        for name in lora_modules(chunk):
            block_roles = plan.vision_block if name.startswith("visual.blocks.") else plan.decoder_layer
            path = name.split(".", 3)[-1] if name.startswith("visual.blocks.") else name.split(".", 2)[-1]
            role = block_roles.get(path) if name.startswith(("layers.", "visual.blocks.")) else None
            a, b = params[f"{name}.lora_A.weight"], params[f"{name}.lora_B.weight"]
            where = (name, tp_placement(a), tp_placement(b))
            if role == "colwise":
                assert tp_placement(a) == Replicate() and tp_placement(b) == Shard(0), where
            elif role == "rowwise":
                assert tp_placement(a) == Shard(1) and tp_placement(b) == Replicate(), where
            else:
                assert tp_placement(a) is None and tp_placement(b) is None, name
                role = "plain"
            seen[role] += 1
    assert seen["colwise"] and seen["rowwise"], seen
    return seen


def check_lora_optimizer(res: dict, dims) -> dict:
    """Only adapters (and fully trained groups) have optimizer state; the one-process AdamW state is exactly
    exp_avg + exp_avg_sq (fp32) of the trainable parameters, and each rank holds its share: 1/dp of it under
    ZeRO-1, and of a tp-sharded factor 1/(dp * tp) (replicated factors 1/dp), within 10% (uneven shards)."""
    names = {id(p): n for n, p in res["pm"].named_parameters()}
    full = set(res["lora"].get("fully_trainable", []))
    family = get_family(res["family"])
    for p in res["opt"].state:
        n = names[id(p)]
        assert ".lora_" in n or family.group_of(n) in full, f"{n} has optimizer state but is no adapter"
    ref = res["ref"]
    n_train = sum(p.numel() for p in ref.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in ref.parameters())
    assert res["ref_opt_bytes"] == 8 * n_train, (res["ref_opt_bytes"], n_train)
    share = 0.0
    for p in res["pm"].parameters():
        if p.requires_grad:  # FSDP shards every trainable parameter over dp; TP-sharded factors over tp too
            dims_ = p.device_mesh.mesh_dim_names or ()
            tp_sharded = "tp" in dims_ and not p.placements[dims_.index("tp")].is_replicate()
            share += 8 * p.numel() / (dims.dp * (dims.tp if tp_sharded else 1))
    ratio = res["opt_bytes"] / share
    assert abs(ratio - 1) <= 0.10, f"optimizer state {res['opt_bytes']} B vs this rank's share {share:.0f} B"
    if dims.pp == 1:
        # The dry run's accounting (train/dry_run.py, from the family's roles) predicts this rank's bytes exactly.
        from train.dry_run import rank_numel

        predicted = 8 * rank_numel(ref, dims.tp).trainable // dims.dp
        assert predicted == res["opt_bytes"], f"dry-run accounting {predicted} B, measured {res['opt_bytes']} B"
    out = {"opt_bytes": res["opt_bytes"], "share_bytes": share, "ratio": ratio, "one_process_bytes":
           res["ref_opt_bytes"], "trainable": n_train, "total": n_total, "full_training_opt_bytes": 8 * n_total}
    if dims.tp == 1 and dims.pp == 1:
        out["zero1"] = check_zero1_bytes(res, dims)
    return out


def check_lora_dropout(dims, cfg, family: str) -> dict:
    """Adapter dropout under this layout: no one-process equality (the masks are random), but the replicated
    factors must stay bitwise equal across tp ranks through training steps (their gradients are reduced), and the
    training-mode loss must differ from the eval-mode one (dropout is applied)."""
    import dataclasses

    torch.manual_seed(0)
    model = VLModel(tiny_config(family=family))
    _add_lora(model, {"lora": {**LORA_SMOKE, "dropout": 0.3}})
    pm = parallelize(model, dims, dataclasses.replace(cfg, check_replicated_every=1))
    m = cfg.num_microbatches
    gb = global_batch(7, dims.dp * m, family=family)
    mine = gb[dims.dp_rank * m : (dims.dp_rank + 1) * m] if dims.is_first_stage else None
    by_mode = {}
    for training in (True, False):
        for mod in pm.modules:
            mod.train(training)
        by_mode[training] = pm.evaluate(mine).loss
    assert abs(by_mode[True] - by_mode[False]) > 1e-6, f"dropout changed nothing: {by_mode}"
    for mod in pm.modules:
        mod.train()
    opt = _adamw([p for p in pm.parameters() if p.requires_grad], foreach=False)
    losses = []
    for step in range(2):
        gb = global_batch(step, dims.dp * m, family=family)
        losses.append(pm.step(gb[dims.dp_rank * m : (dims.dp_rank + 1) * m] if dims.is_first_stage else None).loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    pm.check_replicated()  # (step() also checks at the start of every step: check_replicated_every=1)
    assert all(math.isfinite(x) for x in losses), losses
    return {"losses": losses, "eval_train_mode": by_mode[True], "eval_eval_mode": by_mode[False]}


LORA_SMOKE = {"rank": 4, "alpha": 8.0, "vision": ["attn", "mlp"], "merger": ["all"]}


def check_pipeline(res: dict, dims, cfg) -> dict:
    """Receive buffers have each microbatch's true length; lengths change per step; the schedule's order (1F1B
    or interleaved warm-up count); the bytes sent are exactly the activations and gradients of every chunk."""
    shapes = []
    sp = cfg.sequence_parallel and dims.tp > 1
    p, s, v, m = dims.pp, dims.pp_rank, cfg.pp_virtual_stages, cfg.num_microbatches
    vstages = [c * p + s for c in range(v)]
    # Stage 0 knows the true lengths; the other stages get them over the pipeline group to compare.
    for step, stats in enumerate(res["schedules"]):
        lengths = torch.tensor(res["lengths"][step] if dims.is_first_stage else [0] * m)
        dist.broadcast(lengths, src=dims.stage_rank(0), group=dims.get_group("pp"))
        true = [int(t) + (-int(t)) % dims.tp if sp else int(t) for t in lengths]
        expect_rows = [t // dims.tp if sp else t for t in true]
        fwd = {(c, i): sh for d, c, i, sh in stats.recv_shapes if d == "fwd"}
        bwd = {(c, i): sh for d, c, i, sh in stats.recv_shapes if d == "bwd"}
        assert len(fwd) + len(bwd) == len(stats.recv_shapes), "a buffer was received twice"
        # Every chunk but virtual stage 0 receives each microbatch's activation, every chunk but the last
        # virtual stage its gradient, each with exactly that microbatch's rows.
        assert set(fwd) == {(c, i) for c, vs in enumerate(vstages) if vs > 0 for i in range(m)}, sorted(fwd)
        assert set(bwd) == {(c, i) for c, vs in enumerate(vstages) if vs < p * v - 1 for i in range(m)}, sorted(bwd)
        for (c, i), sh in {**fwd, **bwd}.items():
            assert sh == (expect_rows[i], 64), f"step {step} chunk {c} mb {i}: buffer {sh}, true rows {expect_rows[i]}"
        sends = sum(v_ > 0 for v_ in vstages) + sum(v_ < p * v - 1 for v_ in vstages)
        assert stats.sent_bytes == sends * sum(expect_rows) * 64 * 4, (stats.sent_bytes, sends, expect_rows)
        shapes.append(true)
        # Every (F|B, chunk, microbatch) once; warm-up forwards before the first backward: min(p - s - 1, m) for
        # 1F1B, min(v * m, 2(p - s - 1) + (v - 1)p) interleaved (Megatron's counts).
        assert sorted(stats.order) == sorted((k, c, i) for k in "FB" for c in range(v) for i in range(m))
        warmup = min(p - s - 1, m) if v == 1 else min(v * m, 2 * (p - s - 1) + (v - 1) * p)
        first_b = [k for k, (kind, *_) in enumerate(stats.order) if kind == "B"][0]
        assert first_b == warmup + (warmup < v * m), stats.order  # (+1: the steady state's first forward)
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
    family = res["family"]
    torch.manual_seed(123)
    other = parallelize(VLModel(tiny_config(tie=False, family=family)), dims, cfg)
    other.load_state_dict(full)
    for name, p in other.named_parameters():
        assert torch.equal(_full(p.detach()), full[name]), name
    # And DCP straight into the sharded state dict of a fresh model.
    torch.manual_seed(321)
    third = parallelize(VLModel(tiny_config(tie=False, family=family)), dims, cfg)
    sd = third.state_dict()
    dcp.load(sd, checkpoint_id=ckpt)
    third.load_state_dict(sd)
    for name, p in third.named_parameters():
        assert torch.equal(_full(p.detach()), full[name]), name
    return {"dcp_keys": len(own)}


def check_bf16_smoke(dims, cfg, family: str) -> dict:
    """bf16 compute through the same layout (P2P buffers, SP, vocab-parallel loss in bf16): runs, and the loss
    stays within 2% of the fp32 one-process loss (bf16 is not expected to be bitwise equal)."""
    import dataclasses

    torch.manual_seed(0)
    ref = VLModel(tiny_config(family=family))
    pm = parallelize(copy.deepcopy(ref), dims, dataclasses.replace(cfg, mixed_precision="bf16"))
    m = cfg.num_microbatches
    out = []
    for step in range(2):
        gb = global_batch(10 + step, dims.dp * m, family=family)
        with torch.no_grad():
            ref_sum = sum(float(model_loss(ref, mb.labels, **mb.model_inputs())[0]) for mb in gb)
            ref_loss = ref_sum / sum(mb.num_supervised for mb in gb)
        res = pm.step(gb[dims.dp_rank * m : (dims.dp_rank + 1) * m] if dims.is_first_stage else None)
        assert abs(res.loss - ref_loss) <= 2e-2 * ref_loss, (res.loss, ref_loss)
        out.append((res.loss, ref_loss))
    return {"losses": out}


def layout_worker(rank: int, world: int, spec: dict) -> dict:
    t0 = time.perf_counter()
    family = spec.get("family", "qwen2_vl")
    par = dict(spec["parallel"])
    if par.get("pp", 1) > 1 and "pp_first_stage_layers" in par:
        # DeepStack's decoder layers must sit in stage 0 with the ViT (Qwen3-VL: 2 of the tiny model's).
        need = get_family(family).stage0_decoder_layers(tiny_config(family=family))
        par["pp_first_stage_layers"] = max(par["pp_first_stage_layers"], need)
    spec = {**spec, "parallel": par}
    cfg = ParallelConfig(**par)
    dims = init_distributed(cfg)
    res = run_equivalence(spec, dims, cfg)
    report = {
        "rank": rank, "loss": res["losses"], "ref_loss": res["ref_losses"], "grad_rel": res["grad_rel"],
        "param_diff": res["param_diff"], "norm": res["norm"],
    }
    if spec.get("eval"):
        report["eval"] = res["eval"]
    if "lora_materialized" in res:
        report["lora_materialized"] = res["lora_materialized"]
    for check in spec.get("checks", []):
        if check == "zero1":
            report["zero1"] = check_zero1_bytes(res, dims)
        elif check == "zero1_comm":
            report["zero1_comm"] = check_zero1_comm(dims, cfg, family)
        elif check == "tp":
            report["tp"] = check_tp_layout(res, dims, cfg)
        elif check == "pp":
            report["pp"] = check_pipeline(res, dims, cfg)
        elif check == "dcp":
            report["dcp"] = check_dcp_roundtrip(res, dims, cfg, spec["tmpdir"])
        elif check == "lora_tp":
            report["lora_tp"] = check_lora_layout(res, dims)
        elif check == "lora_dropout":
            report["lora_dropout"] = check_lora_dropout(dims, cfg, family)
        elif check == "lora_opt":
            report["lora_opt"] = check_lora_optimizer(res, dims)
        elif check == "bf16_smoke":
            report["bf16"] = check_bf16_smoke(dims, cfg, family)
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
    pm = parallelize(VLModel(tiny_config()), dims, cfg)
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
        return {"rank": rank, "error": f"{type(e).__name__}: {str(e)[:400]}", "elapsed": elapsed}
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
    ref = VLModel(tiny_config())
    with torch.device("meta"):
        meta_model = VLModel(tiny_config())
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
    _local(next(p for _, p in pm.named_parameters()).grad).view(-1)[0] = float("inf")
    before = [p.grad.clone() for _, p in pm.named_parameters() if p.grad is not None]
    assert torch.isinf(pm.clip_grad_norm_(1.0))
    after_g = [p.grad for _, p in pm.named_parameters() if p.grad is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after_g)), "a non-finite norm must not scale gradients"
    # bf16 compute with fp32 master weights and fp32 gradients.
    torch.manual_seed(0)
    ref = VLModel(tiny_config())
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
    # Activation checkpointing under bf16 (FSDP casts the block inputs in its pre-forward hook): every mode
    # trains like the unchecked bf16 step. Before: selective per-op checkpointing failed in backward
    # ("profiler._record_function_enter_new ... not found in storage"): the recompute replayed FSDP's hook.
    for name, ac in {"bf16_selective_op": {"activation_checkpoint": "selective", "ac_selective": "op"},
                     "bf16_full": {"activation_checkpoint": "full"}}.items():
        torch.manual_seed(0)
        pm_ac = parallelize(copy.deepcopy(VLModel(tiny_config())), dims, ParallelConfig(mixed_precision="bf16", **ac))
        res_ac = pm_ac.step(gb)
        assert res_ac.loss == res16.loss, (name, res_ac.loss, res16.loss)
        report[name] = max((_full(p.grad) - _full(q.grad)).abs().max().item() / max(_full(q.grad).abs().max().item(),
                           1e-30) for (_, p), (_, q) in zip(pm_ac.named_parameters(), pm16.named_parameters()))
    return report


# ------------------------------------------------------------------------------------------ checkpoints
def interleaved_checkpoint_worker(rank: int, world: int, tmpdir: str) -> dict:
    """pp2 x v2 (interleaved 1F1B: two model chunks per rank) trains 2 steps and saves model + AdamW state through
    train/state.py's ModelState / OptimizerState (one DCP save); that checkpoint loads into pp2 with 1F1B (one
    chunk per rank, another stage split) and into one process (rank 0, no process group) with bitwise-equal
    weights and optimizer state, and all three then train the same step to the same loss and parameters."""
    import dataclasses

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from train.state import ModelState, OptimizerState

    one_f = ParallelConfig(pp=2, num_microbatches=4, pp_first_stage_layers=1)
    inter = dataclasses.replace(one_f, pp_schedule="interleaved_1f1b", pp_virtual_stages=2)
    dims = init_distributed(one_f)
    m = 4

    def mine(gb):
        return gb if dims.is_first_stage else None

    def state(modules, opt):
        return {"model": ModelState(modules), "optim": OptimizerState(modules, opt)}

    torch.manual_seed(0)
    a = parallelize(VLModel(tiny_config(tie=True)), dims, inter)
    assert len(a.modules) == 2
    opt_a = _adamw([p for p in a.parameters() if p.requires_grad], foreach=False)
    for step in range(2):
        a.step(mine(global_batch(step, m)))
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
    ckpt = os.path.join(tmpdir, "interleaved")
    dcp.save(state(a.modules, opt_a), checkpoint_id=ckpt)
    dist.barrier()
    full_path = os.path.join(tmpdir, f"full_{rank}.pt")
    dcp_to_torch_save(ckpt, full_path)
    full = torch.load(full_path, weights_only=True)
    # The saved optimizer state holds every trainable parameter of the model once, by single-process FQN.
    ref_names = {n for n, _ in VLModel(tiny_config(tie=True)).named_parameters()}
    saved_exp_avg = {k[len("state."):-len(".exp_avg")] for k in full["optim"] if k.endswith(".exp_avg")}
    assert saved_exp_avg == ref_names, sorted(saved_exp_avg ^ ref_names)

    def assert_equal_to_checkpoint(modules, opt, named) -> list[str]:
        for name, p in named:
            assert torch.equal(_full(p.detach()), full["model"][name]), f"weight {name} differs after resume"
        osd = OptimizerState(modules, opt).state_dict()
        keys = [k for k in osd if k.startswith("state.")]
        assert keys and all(torch.equal(_full(osd[k]) if torch.is_tensor(osd[k]) else torch.tensor(osd[k]),
                                        torch.as_tensor(full["optim"][k])) for k in keys), "optimizer state differs"
        return sorted(keys)

    # Into pp2 with 1F1B, from other initial weights.
    torch.manual_seed(123)
    b = parallelize(VLModel(tiny_config(tie=True)), dims, one_f)
    opt_b = _adamw([p for p in b.parameters() if p.requires_grad], foreach=False)
    dcp.load(state(b.modules, opt_b), checkpoint_id=ckpt)
    report = {"rank": rank, "pp2_opt_keys": assert_equal_to_checkpoint(b.modules, opt_b, b.named_parameters())}
    # Into one process (rank 0, without collectives).
    c = opt_c = None
    if rank == 0:
        torch.manual_seed(7)
        c = VLModel(tiny_config(tie=True))
        opt_c = _adamw(c.parameters())
        dcp.load(state([c], opt_c), checkpoint_id=ckpt, no_dist=True)
        report["one_process_opt_keys"] = assert_equal_to_checkpoint([c], opt_c, c.named_parameters())
    # All three continue: the same loss, and after AdamW (its restored moments) the same parameters and eval.
    gb = global_batch(2, m)
    la, lb = a.step(mine(gb)).loss, b.step(mine(gb)).loss
    for opt in (opt_a, opt_b):
        opt.step()
    ev = global_batch(9, m)
    ea, eb = a.evaluate(mine(ev)).loss, b.evaluate(mine(ev)).loss
    assert abs(la - lb) <= 1e-6 * la and abs(ea - eb) <= 1e-5 * ea, (la, lb, ea, eb)
    report.update(losses=(la, lb), evals=(ea, eb))
    if rank == 0:
        lc = reference_step(c, gb)
        opt_c.step()
        with torch.no_grad():
            ec = sum(float(model_loss(c, mb.labels, **mb.model_inputs())[0]) for mb in ev)
        ec /= sum(mb.num_supervised for mb in ev)
        assert abs(lc - la) <= 1e-5 * la and abs(ec - ea) <= 1e-5 * ea, (la, lc, ea, ec)
        report["param_diff"] = max(compare_params(a, c), compare_params(b, c))
        report.update(one_process=(lc, ec))
    return report


def frozen_tp_worker(rank: int, world: int) -> dict:
    """tp2 with SP over a model whose ViT or LLM is frozen, built in full and on the meta device: the frozen
    parameters that require grad after parallelize (torch's SequenceParallel re-registers the norms'
    parameters)."""
    cfg = ParallelConfig(tp=2)
    dims = init_distributed(cfg)
    out = {}
    for freeze in ("vision", "llm"):
        for meta in (False, True):
            with torch.device("meta" if meta else "cpu"):
                model = VLModel(tiny_config())
            _freeze(model, freeze)
            frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
            pm = parallelize(model, dims, cfg)
            if meta:
                pm.materialize(init_weights=True)
            out[f"{freeze}_meta" if meta else freeze] = sorted(n for n, p in pm.named_parameters()
                                                               if n in frozen and p.requires_grad)
    return out


class _DTensorOps(TorchDispatchMode):
    """Counts the ops dispatched with a DTensor among their arguments (each one a trip through DTensor's
    sharding propagation)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(isinstance(t, DTensor) for t in tree_leaves((args, kwargs or {}))):
            self.count += 1
        return func(*args, **(kwargs or {}))


def shard_local_adamw_worker(rank: int, world: int, tmpdir: str, fused_impl: str) -> dict:
    """dp = world (FSDP2: DTensor parameters; a 1-rank mesh when world = 1): train/optim.py's ShardLocalAdamW gives
    bitwise the losses, parameters and checkpointed optimizer state of torch's AdamW over the DTensors while its
    step dispatches no op on a DTensor; a run resumed from its DCP checkpoint continues bitwise."""
    import torch.distributed.checkpoint as dcp

    from train.optim import ShardLocalAdamW
    from train.state import ModelState, OptimizerState

    cfg = ParallelConfig(dp=world, num_microbatches=2)
    dims = init_distributed(cfg)
    m = cfg.num_microbatches

    def build(cls, seed: int = 0):
        torch.manual_seed(seed)
        pm = parallelize(VLModel(tiny_config()), dims, cfg)
        ps = [p for p in pm.parameters() if p.requires_grad]
        groups = [{"params": ps[::2], "weight_decay": 0.1}, {"params": ps[1::2], "weight_decay": 0.0}]
        return pm, cls(groups, lr=1e-3, eps=1e-6, **{fused_impl: True})

    def state(pm, opt):
        return {"model": ModelState(pm.modules), "optim": OptimizerState(pm.modules, opt)}

    def train(pm, opt, steps) -> tuple[list[float], int]:
        """Losses, and the DTensor ops of the optimizer steps after the first (which creates the state: AdamW's
        zeros_like of each DTensor parameter)."""
        losses, n = [], 0
        for step in steps:
            gb = global_batch(step, dims.dp * m)
            losses.append(pm.step(gb[dims.dp_rank * m : (dims.dp_rank + 1) * m]).loss)
            with _DTensorOps() as ops:
                opt.step()
            n += ops.count if opt.state and step != steps[0] else 0
            opt.zero_grad(set_to_none=True)
        return losses, n

    (a, opt_a), (b, opt_b) = build(torch.optim.AdamW), build(ShardLocalAdamW)
    assert all(isinstance(p, DTensor) for p in b.parameters())
    la, ops_a = train(a, opt_a, range(2))
    lb, ops_b = train(b, opt_b, range(2))
    assert la == lb, (la, lb)
    assert ops_a > 0 and ops_b == 0, (ops_a, ops_b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa.to_local(), pb.to_local()), name
    sa, sb = OptimizerState(a.modules, opt_a).state_dict(), OptimizerState(b.modules, opt_b).state_dict()
    assert sa.keys() == sb.keys() and any(k.endswith(".exp_avg") for k in sb)
    for k in sa:
        va, vb = sa[k], sb[k]
        assert type(va) is type(vb), k  # DTensor state, as before: the checkpoint format is unchanged
        assert (torch.equal(va.to_local(), vb.to_local()) and va.placements == vb.placements
                if isinstance(va, DTensor) else (torch.equal(va, vb) if torch.is_tensor(va) else va == vb)), k
    ckpt = os.path.join(tmpdir, "local_adamw")
    dcp.save(state(b, opt_b), checkpoint_id=ckpt)
    # Resume into other initial weights: the next steps equal the uninterrupted run's, bitwise.
    c, opt_c = build(ShardLocalAdamW, seed=123)
    dcp.load(state(c, opt_c), checkpoint_id=ckpt)
    lb_next, _ = train(b, opt_b, range(2, 4))
    lc_next, _ = train(c, opt_c, range(2, 4))
    assert lb_next == lc_next, (lb_next, lc_next)
    for (name, pb), pc in zip(b.named_parameters(), c.parameters(), strict=True):
        assert torch.equal(pb.to_local(), pc.to_local()), name
    return {"rank": rank, "losses": lb + lb_next, "dtensor_ops_in_step": (ops_a, ops_b)}
