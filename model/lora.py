"""LoRA (Hu et al. 2021): low-rank adapters on the model's linear projections, chosen per parameter group.

    model = VLModel(cfg)                                   # or loaded from an HF directory
    targets = apply_lora(model, LoRAConfig(rank=16, alpha=32, vision=["attn", "mlp"]))

`apply_lora` replaces each targeted `nn.Linear` by a `LoRALinear` that owns the same weight and bias Parameters
(so `layers.0.self_attn.q_proj.weight` stays the key in checkpoints and HF export) plus two factors,
`<linear>.lora_A.weight` (r, in) and `<linear>.lora_B.weight` (out, r) (peft's names), and computes

    y = x W^T + b + scaling * B A dropout(x),    scaling = alpha / r   (rslora: alpha / sqrt(r), Kalajdzievski 2023)

B starts at zero, so a LoRA model's output equals the base model's exactly at step 0; A starts like peft's
default (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), drawn from a generator seeded by the seed and
the module's name, so every layout (and the meta-device path) builds the same adapters. Every base parameter is
frozen (requires_grad False, kept in its dtype) except those of the groups named in `fully_trainable`.

Targets are chosen per parameter group (the family's `group_of`: vision / merger / llm), each a list of
- `attn` / `mlp`: the attention / MLP projections of the group's blocks (decoder layers for llm, ViT blocks for
  vision), read from the family's declared TP roles (model/family.py), so each family's own names are used
  (e.g. the ViT MLP's fc1/fc2, gate/up/down_proj or linear_fc1/fc2);
- `all`: every linear projection of the group (vision: also Qwen3-VL's DeepStack mergers; merger: its MLP);
- a glob over the module name's dotted suffix: `q_proj`, `mlp.*_proj`, `layers.1.self_attn.*`.
The LM head is never a target: the loss reads its weight directly (model/loss.py, the vocab-parallel loss).

Merging folds scaling * B A into the weight: `merge_lora_` in place, or `merged_state_dict` for export (a plain
model's state dict, the model unchanged). Tensor parallelism shards the factors in parallel/tensor_parallel.py
(from the base projection's role); the peft file format is model/lora_peft.py.
"""

from __future__ import annotations

import fnmatch
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.family import GROUPS, get_family

KEYWORDS = ("attn", "mlp", "all")
"""Target keywords (see the module doc); anything else is a glob pattern."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (LoRA) on linear projections; the base weights are frozen."""

    rank: int = 16
    """Rank r of every adapter (A: r x in, B: out x r)."""
    alpha: float = 32.0
    """Scale numerator: the adapter's output is multiplied by alpha / rank (alpha / sqrt(rank) with rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (training only), in [0, 1)."""
    rslora: bool = False
    """Rank-stabilized scaling alpha / sqrt(rank) (Kalajdzievski 2023) instead of alpha / rank."""
    llm: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    """Targets in the LLM: 'attn' (q/k/v/o projections), 'mlp' (gate/up/down), 'all', or globs over the module
    name's dotted suffix (e.g. 'q_proj', 'layers.1*.mlp.*'); [] = no adapters in the LLM."""
    vision: list[str] = field(default_factory=list)
    """Targets in the ViT (opt in): 'attn', 'mlp' (the family's ViT MLP projections), 'all' or globs; [] = none."""
    merger: list[str] = field(default_factory=list)
    """Targets in the merger group (opt in: the patch merger, and Qwen3-VL's DeepStack mergers): 'all' or globs
    (e.g. 'mlp.0'); [] = none."""
    fully_trainable: list[str] = field(default_factory=list)
    """Groups trained in full beside the adapters (e.g. [merger]); every other base weight is frozen."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora.rank={self.rank}: must be a positive integer (e.g. 8, 16, 64)")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha}: must be > 0 (the adapter's scale is alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout={self.dropout}: must be in [0, 1)")
        for g in self.fully_trainable:
            if g not in GROUPS:
                raise ValueError(f"lora.fully_trainable: unknown group {g!r}; groups are {', '.join(GROUPS)}")
            if self.targets(g):
                raise ValueError(f"lora.fully_trainable names {g!r}, which lora.{g} also targets with adapters; "
                                 f"train it fully (set lora.{g}: []) or with adapters (drop it from fully_trainable)")
        if not any(self.targets(g) for g in GROUPS):
            raise ValueError("lora: no targets in any group (lora.llm, lora.vision and lora.merger are all empty)")

    def check_frozen(self, frozen_groups: Iterable[str]) -> None:
        """A ValueError naming the fix when adapters or full training are asked of a group the stage freezes."""
        frozen = set(frozen_groups)
        for group in GROUPS:
            if self.targets(group) and group in frozen:
                raise ValueError(f"lora.{group}={self.targets(group)} puts adapters on the {group} group, which this "
                                 f"stage freezes (train.freeze); set lora.{group}: [] or stop freezing {group}")
        if clash := sorted(frozen & set(self.fully_trainable)):
            raise ValueError(f"lora.fully_trainable names {clash[0]!r}, which this stage freezes (train.freeze); "
                             "drop one of the two")

    def targets(self, group: str) -> list[str]:
        return list(getattr(self, group))

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# ------------------------------------------------------------------------------------------ modules
class LoRAFactor(nn.Module):
    """One factor (A or B) of an adapter: a bias-free projection by `weight` (out, in). Deliberately not an
    nn.Linear, so nothing that looks for projections (targets, init, TP plans) takes it for one."""

    def __init__(self, in_features: int, out_features: int, like: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=like.dtype, device=like.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank adapter: y = F.linear(x, W, b) + scaling * lora_B(lora_A(dropout(x))).

    It takes over the base layer's weight and bias Parameters (no copy), so their names and values are unchanged;
    it is still an nn.Linear (its base weight is initialized and loaded like any projection's)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float, init_seed: int) -> None:
        nn.Module.__init__(self)  # no nn.Linear.__init__: the base's Parameters are taken, not allocated
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scaling, self.init_seed = rank, scaling, init_seed
        self.lora_A = LoRAFactor(self.in_features, rank, like=base.weight)
        self.lora_B = LoRAFactor(rank, self.out_features, like=base.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if not base.weight.is_meta:
            self.reset_lora_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same op order as peft's Linear: base output, then + B(A(dropout(x))) * scaling.
        return F.linear(x, self.weight, self.bias) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """A from U(-1/sqrt(in), 1/sqrt(in)) (peft's kaiming-uniform default) by this module's own seed, B = 0.
        A is drawn whole on the CPU, so a sharded A (tensor/data parallel) gets its slice of the same matrix."""
        gen = torch.Generator().manual_seed(self.init_seed)
        bound = 1.0 / math.sqrt(self.in_features)
        full_A = torch.empty(self.rank, self.in_features).uniform_(-bound, bound, generator=gen)
        _copy_whole(self.lora_A.weight, full_A)
        _copy_whole(self.lora_B.weight, torch.zeros(self.out_features, self.rank))

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A (out, in) in fp32 (plain, unsharded factors)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear whose weight is W + scaling * B A (in W's dtype); this module is unchanged."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                out.bias.copy_(self.bias)
        out.weight.requires_grad_(self.weight.requires_grad)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _copy_whole(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a whole-tensor value into `param`, or into its local shard when it is a DTensor (model/ stays free of
    parallel code: the slice comes from the DTensor's own placements)."""
    if hasattr(param, "device_mesh") and hasattr(param, "to_local"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        full = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        param = param.to_local()
    param.copy_(full.to(param.dtype))


# ------------------------------------------------------------------------------------------ targets
def _projections(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's linear projections that may take an adapter, by module name (the LM head excluded)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def _block_paths(model: nn.Module, group: str, kind: str) -> set[str]:
    """Module names of the attention ('attn') or MLP ('mlp') projections of the group's blocks, from the
    family's declared roles: the colwise/rowwise paths under the block's attention or MLP module."""
    plan = get_family(model.cfg.family).plan(model.cfg)
    if group == "llm":
        roles, blocks = plan.decoder_layer, [f"layers.{k}" for k in model.layers]
    elif group == "vision":
        roles, blocks = plan.vision_block, ([] if model.visual is None else
                                            [f"visual.blocks.{k}" for k in model.visual.blocks])
    else:
        return set()
    containers = [p for p, r in roles.items() if r == "gather_input" and (("attn" in p) == (kind == "attn"))]
    paths = [p for p, r in roles.items() if r in ("colwise", "rowwise")
             and any(p.startswith(c + ".") for c in containers)]
    return {f"{b}.{p}" for b in blocks for p in paths}


def _suffix_match(name: str, pattern: str) -> bool:
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def resolve_targets(model: nn.Module, cfg: LoRAConfig, frozen_groups: Iterable[str] = ()) -> dict[str, str]:
    """{module name: group} of the projections `cfg` targets; a ValueError naming the fix for a pattern that
    matches nothing in its group, a keyword used where it has no meaning, or a target in a frozen group."""
    family = get_family(model.cfg.family)
    cfg.check_frozen(frozen_groups)
    projections = _projections(model)
    group_of = {n: family.group_of(f"{n}.weight") for n in projections}
    chosen: dict[str, str] = {}
    for group in GROUPS:
        patterns = cfg.targets(group)
        in_group = [n for n in projections if group_of[n] == group]
        for pat in patterns:
            if pat in ("attn", "mlp"):
                hits = sorted(_block_paths(model, group, pat) & set(in_group))
            elif pat == "all":
                hits = in_group
            else:
                hits = [n for n in in_group if _suffix_match(n, pat)]
            if not hits:
                raise ValueError(f"lora.{group}: target {pat!r} matches no linear projection of the {group} group "
                                 f"(e.g. {', '.join(in_group[:3]) or 'none in this model'}); use one of "
                                 f"{', '.join(KEYWORDS)} or a glob over the module name (e.g. 'q_proj')")
            chosen.update((n, group) for n in hits)
    return chosen


def _init_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def apply_lora(model: nn.Module, cfg: LoRAConfig, frozen_groups: Iterable[str] = (), seed: int = 0) -> dict[str, str]:
    """Put adapters on the projections `cfg` targets (in place; works on the meta device) and freeze every base
    parameter outside cfg.fully_trainable. Returns {module name: group} of the adapted projections.

    Call it on the whole single-device model, before parallelize() (which shards the factors by the base
    projection's role) and before loading weights (base weights keep their names)."""
    cfg.validate()
    frozen = set(frozen_groups)
    cfg.check_frozen(frozen)
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; apply_lora runs once per model")
    targets = resolve_targets(model, cfg, frozen)
    family = get_family(model.cfg.family)
    for name, p in model.named_parameters():
        if family.group_of(name) not in cfg.fully_trainable or family.group_of(name) in frozen:
            p.requires_grad_(False)
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        setattr(parent, attr, LoRALinear(base, cfg.rank, cfg.scaling, cfg.dropout, _init_seed(seed, name)))
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} of the model (empty without adapters)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter factor (`...lora_A.weight` / `...lora_B.weight`)."""
    return key.endswith((".lora_A.weight", ".lora_B.weight"))


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' factors by state-dict key (`<linear>.lora_A.weight`, `<linear>.lora_B.weight`)."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


# ------------------------------------------------------------------------------------------ merging
@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight in place: each LoRALinear becomes a plain nn.Linear holding
    W + scaling * B A (a plain model again, same state-dict keys as before apply_lora). Returns the model."""
    for name, mod in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, mod.merged())
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the merged model (base keys, adapters folded in; the model is unchanged): what an HF
    export of a LoRA run writes."""
    sd = {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}
    for name, mod in lora_modules(model).items():
        sd[f"{name}.weight"] = (mod.weight.float() + mod.delta_weight()).to(mod.weight.dtype)
    return sd


def merged_state_dict_from(sd: dict[str, torch.Tensor], scaling: float | dict[str, float]) -> dict[str, torch.Tensor]:
    """Fold the adapters of a full state dict (base weights + `...lora_A/B.weight`) into the weights, without a
    model: W + scaling * B A per adapted projection (`scaling`: one value, or per module name)."""
    out = {k: v for k, v in sd.items() if not is_adapter_key(k)}
    for key in sd:
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            s = scaling[name] if isinstance(scaling, dict) else scaling
            w = sd[f"{name}.weight"]
            delta = (sd[f"{name}.lora_B.weight"].float() @ sd[key].float()) * s
            out[f"{name}.weight"] = (w.float() + delta).to(w.dtype)
    return out
