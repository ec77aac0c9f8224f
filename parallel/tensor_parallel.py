"""Tensor parallelism with sequence parallelism (Korthikanti et al. 2022) over the ViT and the LLM, as DTensor
`parallelize_module` plans built from the model family's declared roles (model/family.py); divisibility checks;
tail padding of packed sequences for SP.

Shape legend: T = packed LLM tokens, N = ViT patch rows, D = LLM width, C = ViT width, P = pixel row length,
tp = tensor-parallel degree. A `_S` suffix marks a tensor sharded along the sequence (T/tp or N/tp rows).

Layout of one decoder layer (ViT blocks are the same with norm1/attn/norm2/mlp):

    x_S ── norm (SequenceParallel, on T/tp rows) ── all-gather ── q/k/v Colwise (local heads) ── attention
        ── o_proj Rowwise ── reduce-scatter ──> + x_S ── norm ── all-gather ── gate/up Colwise ── down Rowwise
        ── reduce-scatter ──> + x_S

The residual stream between blocks is a plain local tensor of T/tp rows (what torchtitan does); norms see it
as a Shard(0) DTensor. Stage 0 enters the sharded region at the first decoder layer (Replicate -> Shard(0) is a
local slice) and the ViT at its first block; the merger gathers the ViT rows and stays replicated (few
parameters, and its 2x2 windows need whole rows). The token embedding is vocab-parallel (all-reduced output,
so the vision embeddings can be scattered into it); the LM head is vocab-parallel (parallel/vocab_parallel.py).

Weights that stay whole on every tp rank fall in two groups:
- norms under SP and Rowwise biases are Replicate DTensors: their gradient is a Partial sum over sequence
  shards, which FSDP2 all-reduces over tp when it reduces gradients;
- the patch embedding, the mergers (and Qwen3-VL's position table) are plain tensors computed redundantly on every
  tp rank: their gradients are equal only if every kernel is deterministic, so the engine averages them over tp
  after each backward (`plain_replicated_names`) and can check bitwise equality;
- Qwen3's QK-norm weights (role head_norm) are plain tensors applied to this rank's heads only: their gradients are
  partial sums, which the engine sums over tp.

LoRA (model/lora.py): a projection with an adapter takes its base role's split, and the adapter's factors follow
the base weight's input and output: for a colwise projection y = x W^T with W Shard(0) (output rows), A (r, in)
is replicated and B (out, r) Shard(0) like the output; for a rowwise one, W Shard(1) (input columns), A Shard(1)
like the input and B replicated. The adapter's output then has the base output's placement (colwise: Shard(-1);
rowwise: a Partial sum, reduced with the base output by the same all-reduce / reduce-scatter), so no collective is
added. The replicated factor's gradient is a Partial sum over tp, reduced like the norms'.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from core.batch import IGNORE_INDEX, PackedBatch
from model.config import ModelConfig
from model.family import TP_ROLES, get_family
from model.lora import LoRALinear
from model.vision import vit_row_padding


# ------------------------------------------------------------------------------------------ checks
def check_tp_divisibility(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError before anything is built when a head count or width does not split over tp."""
    if tp == 1:
        return
    v, t = cfg.vision, cfg.text
    checks = [
        ("vision.num_heads", v.num_heads),
        ("the vision MLP width (vision.intermediate_size, or embed_dim x mlp_ratio)", v.mlp_dim),
        ("text.num_heads", t.num_heads),
        ("text.num_kv_heads", t.num_kv_heads),
        ("text.intermediate_size", t.intermediate_size),
        ("text.vocab_size", t.vocab_size),
    ]
    bad = [f"{name}={value}" for name, value in checks if value % tp]
    if bad:
        raise ValueError(
            f"tensor parallelism tp={tp} needs these to be divisible by {tp}: {', '.join(bad)}; "
            f"choose a tp that divides them (e.g. a divisor of text.num_kv_heads={t.num_kv_heads})"
        )


# ------------------------------------------------------------------------------------------ plans
class FirstInput(ParallelStyle):
    """Redistribute a module's first positional input (the hidden states) from `src` to `dst` placement over the
    tp mesh; the other inputs (rotary angles, segment boundaries, ...) pass through untouched, whatever their
    number. `local`: hand the module a plain tensor instead of a DTensor."""

    def __init__(self, src, dst, local: bool) -> None:
        super().__init__()
        self.src, self.dst, self.local = src, dst, local

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(_module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            dt = x if isinstance(x, DTensor) else DTensor.from_local(x, device_mesh, (self.src,), run_check=False)
            dt = dt.redistribute(placements=(self.dst,))
            return (dt.to_local() if self.local else dt, *args[1:])

        module.register_forward_pre_hook(hook)
        return module


class ShardSequenceKwargs(ParallelStyle):
    """Keep this rank's sequence shard of whole-sequence keyword inputs (e.g. a decoder layer's DeepStack features,
    model/text.py DecoderLayer.SEQUENCE_KWARGS), so they line up with the sequence-sharded hidden states."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            for name in self.names:
                if kwargs.get(name) is not None:
                    dt = DTensor.from_local(kwargs[name], device_mesh, (Replicate(),), run_check=False)
                    kwargs[name] = dt.redistribute(placements=(Shard(0),)).to_local()
            return args, kwargs

        module.register_forward_pre_hook(hook, with_kwargs=True)
        return module


def _shard_params(module: nn.Module, placements: dict[str, Placement], mesh: DeviceMesh, src_data_rank) -> None:
    """Replace the module's own parameters named in `placements` by DTensors placed so (requires_grad kept)."""
    for name, placement in placements.items():
        p = module._parameters.get(name)
        if p is not None:
            dt = distribute_tensor(p, mesh, [placement], src_data_rank=src_data_rank)
            module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


class LoRAColwiseParallel(ColwiseParallel):
    """ColwiseParallel for a projection with a LoRA adapter: W, b and lora_B Shard(0) (output rows); lora_A is left
    to distribute_module, which replicates every parameter a partition function did not place."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name == "":
            _shard_params(module, {"weight": Shard(0), "bias": Shard(0)}, device_mesh, self.src_data_rank)
        elif name == "lora_B":
            _shard_params(module, {"weight": Shard(0)}, device_mesh, self.src_data_rank)


class LoRARowwiseParallel(RowwiseParallel):
    """RowwiseParallel for a projection with a LoRA adapter: W and lora_A Shard(1) (input columns), b replicated,
    lora_B replicated (by distribute_module)."""

    def _partition_linear_fn(self, name, module, device_mesh):
        if name == "":
            _shard_params(module, {"weight": Shard(1), "bias": Replicate()}, device_mesh, self.src_data_rank)
        elif name == "lora_A":
            _shard_params(module, {"weight": Shard(1)}, device_mesh, self.src_data_rank)


def role_style(role: str, sp: bool, lora: bool = False) -> ParallelStyle | None:
    """The ParallelStyle of a declared role (model/family.py TP_ROLES) under SP or plain TP; None = nothing to do
    (head_norm weights stay plain tensors: parallelize() sums their gradients over tp). `lora`: the projection
    carries a LoRA adapter (its factors are placed from the role, see the module doc)."""
    if role == "colwise":
        return LoRAColwiseParallel() if lora else ColwiseParallel()
    if role == "rowwise":
        cls = LoRARowwiseParallel if lora else RowwiseParallel
        return cls(output_layouts=Shard(0)) if sp else cls()
    if role == "norm":
        return SequenceParallel(sequence_dim=0) if sp else None
    if role == "gather_input":
        # Attention and MLP need the whole sequence: all-gather the sequence shards (reduce-scatter in backward).
        return FirstInput(Shard(0), Replicate(), local=False) if sp else None
    if role == "head_norm":
        return None
    raise ValueError(f"unknown tensor-parallel role {role!r}; known: {', '.join(TP_ROLES)}")


def block_plan(roles: dict[str, str], sp: bool, first: bool, lora: frozenset[str] = frozenset()
               ) -> dict[str, ParallelStyle]:
    """TP(+SP) plan of one block from its declared roles. `first`: the block receives a replicated
    (whole-sequence) input and enters the sequence-sharded region (keeps this rank's slice). `lora`: the paths of
    the block's projections that carry LoRA adapters."""
    plan = {path: style for path, role in roles.items() if (style := role_style(role, sp, path in lora)) is not None}
    if first and sp:
        plan[""] = FirstInput(Replicate(), Shard(0), local=True)
    return plan


def top_level_plan(model: nn.Module, gather: tuple[str, ...], sp: bool) -> dict[str, ParallelStyle]:
    """Plans of the stage's top modules (embedding, final norm, merger inputs); the LM head weight is sharded
    separately because the head never runs as a module (the vocab-parallel loss reads its weight)."""
    plan: dict[str, ParallelStyle] = {}
    if model.embed_tokens is not None:
        # Vocab-parallel embedding; the output is all-reduced (Replicate) so vision embeddings can be
        # scattered into the whole sequence before the first layer takes its slice.
        plan["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if model.lm_head is not None and sp:
        plan["norm"] = SequenceParallel(sequence_dim=0)
    if model.visual is not None and sp:
        # The mergers run replicated on all rows: gather the ViT's sequence shards first.
        for fqn in gather:
            plan[fqn] = FirstInput(Shard(0), Replicate(), local=True)
    return plan


# ------------------------------------------------------------------------------------------ apply
def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, sp: bool, pad_multiple: int | None = None,
                          first_stage: bool = True) -> list[str]:
    """Shard a (stage of a) VLModel in place over `tp_mesh` by its family's declared plan (model/family.py). Layer
    names (FQNs) are unchanged. Returns the FQNs of weights whose gradients are partial sums over the tp ranks
    (head_norm roles): the engine sums them.

    pad_multiple: under SP, the ViT's patch rows are padded to a multiple of it (default tp). first_stage: this
    stage embeds the tokens (pipeline stage 0), so its first layer receives the whole sequence."""
    check_tp_divisibility(model.cfg, tp_mesh.size())
    plan = get_family(model.cfg.family).plan(model.cfg)
    # NOTE: torch's SequenceParallel re-registers a norm's weights as new Parameters with requires_grad=True; a
    # frozen group (recipe stages 1 and 3) must stay frozen, so the flags are put back after the plans.
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    tied = model.lm_head is not None and model.embed_tokens is not None and (
        model.lm_head.weight is model.embed_tokens.weight
    )
    partial: list[str] = []
    towers = [(model.vision_blocks(), plan.vision_block, True),
              ([(f"{n}", b) for n, b in model.named_decoder_layers()], plan.decoder_layer, first_stage)]
    for blocks, roles, enters in towers:
        for i, (name, block) in enumerate(blocks):
            # A stage that embeds hands whole-sequence embeddings to its first layer; later stages receive
            # already sequence-sharded activations from the previous stage.
            lora = frozenset(p for p, m in block.named_modules() if isinstance(m, LoRALinear))
            if bad := sorted(p for p in lora if roles.get(p) not in ("colwise", "rowwise")):
                raise ValueError(f"{name}.{bad[0]} has a LoRA adapter but no colwise/rowwise tensor-parallel role in "
                                 f"the {get_family(model.cfg.family).title} plan; drop it from the lora targets")
            _parallelize(block, tp_mesh, block_plan(dict(roles), sp, first=enters and i == 0, lora=lora))
            if sp and (kw := getattr(block, "SEQUENCE_KWARGS", ())):
                parallelize_module(block, tp_mesh, ShardSequenceKwargs(tuple(kw)))
            partial += [f"{name}.{path}.{p}" for path, role in roles.items() if role == "head_norm"
                        for p, _ in block.get_submodule(path).named_parameters()]
    if model.visual is not None and sp:
        register_vit_row_padding(model.visual, pad_multiple or tp_mesh.size())
    top = top_level_plan(model, plan.vision_gather, sp)
    if top:
        parallelize_module(model, tp_mesh, top)
    if model.lm_head is not None:
        if tied:
            # parallelize_module replaced embed_tokens.weight; re-tie to the (identically Shard(0)) DTensor.
            model.lm_head.weight = model.embed_tokens.weight
        elif not isinstance(model.lm_head.weight, DTensor):
            parallelize_module(model.lm_head, tp_mesh, ColwiseParallel())
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return partial


def _parallelize(module: nn.Module, mesh: DeviceMesh, plan: dict[str, ParallelStyle]) -> None:
    """parallelize_module, where the key "" styles the module itself (its own input hook)."""
    plan = dict(plan)
    own = plan.pop("", None)
    parallelize_module(module, mesh, plan)
    if own is not None:
        parallelize_module(module, mesh, own)


def plain_replicated_names(model: nn.Module) -> list[str]:
    """FQNs of parameters that every tp rank holds whole as plain tensors (computed redundantly)."""
    return [n for n, p in model.named_parameters(remove_duplicate=True) if not isinstance(p, DTensor)]


# ------------------------------------------------------------------------------------------ ViT row padding
def register_vit_row_padding(tower: nn.Module, multiple: int) -> None:
    """Make the ViT accept any patch-row count under SP: forward hooks pad the rows to a multiple of tp with a
    blank image before the ViT runs and drop its merged tokens after.

    N is always a multiple of 4 (2x2 merge windows), so tp in {1, 2, 4} never pads; otherwise a blank image
    of grid (1, 2, 2j) is appended: its own attention segment, its merged tokens are dropped, so real rows
    and the loss are unchanged (tested against the unpadded ViT)."""
    dropped: list[int] = []  # pre-hook -> post-hook of the same call (a forward never nests in itself)

    def pad(_module: nn.Module, args: tuple) -> tuple:
        pixels_NP, grid_thw, *rest = args
        plan = rest[0] if rest else None
        padded_NP, padded_grid, n_drop = pad_vit_rows(pixels_NP, grid_thw, multiple)
        dropped.append(n_drop)
        if plan is not None and plan.pos_N2.shape[0] != padded_NP.shape[0]:
            plan = None  # built for other rows: the tower builds its own (VLModel.host_inputs pads like this)
        return padded_NP, padded_grid, plan

    def trim(_module: nn.Module, _args: tuple, out: tuple[torch.Tensor, torch.Tensor]) -> tuple:
        n_drop = dropped.pop()
        if not n_drop:
            return out
        tokens_MD, deep_KMD = out  # the tower's (merged tokens, DeepStack features) contract, model/vision.py
        keep = tokens_MD.shape[0] - n_drop
        return tokens_MD[:keep], deep_KMD[:, :keep]

    tower.row_padding = multiple  # VLModel.host_inputs plans the padded rows on the host
    tower.register_forward_pre_hook(pad)
    tower.register_forward_hook(trim)


def pad_vit_rows(pixels_NP: torch.Tensor, grid_thw: torch.Tensor, multiple: int):
    """(pixels, grid, merged tokens to drop) with N padded to a multiple of `multiple` by a blank image
    (model.vision.vit_row_padding)."""
    grid, j = vit_row_padding(grid_thw, multiple)
    if not j:
        return pixels_NP, grid_thw, 0
    return torch.cat([pixels_NP, pixels_NP.new_zeros(4 * j, pixels_NP.shape[1])]), grid, j


# ------------------------------------------------------------------------------------------ SP padding
def pad_microbatch(mb: PackedBatch, multiple: int, pad_token_id: int = 0) -> PackedBatch:
    """Pad a packed microbatch at the tail to a multiple of `multiple` tokens (sequence parallelism).

    The padding is its own segment (cu_seqlens gets one more boundary, so it attends to nothing else and
    nothing attends to it), its labels are -100 (no loss), its positions are 0..n-1 (they do not matter).
    Returns the microbatch itself when no padding is needed.
    """
    T = mb.num_tokens
    n = (-T) % multiple
    if n == 0:
        return mb
    dev = mb.input_ids.device
    ids = torch.cat([mb.input_ids.reshape(-1), torch.full((n,), pad_token_id, dtype=mb.input_ids.dtype, device=dev)])
    labels = torch.cat([mb.labels.reshape(-1), torch.full((n,), IGNORE_INDEX, dtype=mb.labels.dtype, device=dev)])
    pos_3T = torch.cat([mb.position_ids.reshape(3, -1), torch.arange(n, device=dev).expand(3, -1)], dim=1)
    # A fill, not torch.tensor(): a device batch gets no copy from pageable host memory.
    cu = torch.cat([mb.cu_seqlens, torch.full((1,), T + n, dtype=mb.cu_seqlens.dtype, device=dev)])
    return dataclasses.replace(  # the padding is unsupervised: the count and positions stay
        mb, input_ids=ids, labels=labels, position_ids=pos_3T.to(mb.position_ids.dtype), cu_seqlens=cu,
        max_seqlen=max(int(mb.max_seqlen), n), sample_keys=list(mb.sample_keys), supervised=mb.num_supervised,
    )
