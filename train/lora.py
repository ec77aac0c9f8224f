"""LoRA in a training run: what the trainer, the dry run and the metrics call. The recipe section `lora:` is
model.lora.LoRAConfig (null = full training); model/lora.py holds the adapters themselves.

    targets = apply_recipe_lora(model, lcfg, frozen_groups, seed)   # trainer: after freezing, before parallelize
    lora_refreeze(engine.named_parameters(), lcfg, frozen_groups)    # after anything that sets requires_grad
    reset_adapters(engine.modules)                                   # weights loaded without adapters: fresh ones
    peft_init_state(mcfg, lcfg, adapter_dir)                         # init_from a peft adapter directory
    trainable_by_group(model.named_parameters(), family)             # the start event and the metrics line
    tp_local_numel(fqn, numel, tp, mcfg)                             # dry run: an adapter factor's share per rank

The export tool (train/export.py --lora merged|adapter) folds the adapters in or writes peft's format
(model/lora_peft.py). The optimizer needs nothing of its own: it takes the parameters that require grad, which
after apply_lora are the adapters (grouped with their projection's group, so lr_<group> applies) and the groups in
lora.fully_trainable. Checkpoints need nothing either: the adapters are parameters with stable names
(`<linear>.lora_A.weight`), so DCP saves, reshards and resumes them with the rest, and a LoRA run's checkpoint
continues into a LoRA recipe.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.family import get_family
from model.lora import LoRAConfig, apply_lora, is_adapter_key, lora_modules
from model.lora_peft import peft_state_dict
from model.vlm import VLModel

EXPORT_MODES = ("merged", "adapter")
"""`--lora` of the export tool: an HF directory with the adapters folded in, or peft's adapter format."""


def apply_recipe_lora(model: nn.Module, lcfg: LoRAConfig | None, frozen_groups: Iterable[str], seed: int
                      ) -> dict[str, str]:
    """The recipe's adapters on the (meta or materialized) single-device model; {} without a lora section."""
    if lcfg is None:
        return {}
    return apply_lora(model, lcfg, frozen_groups=frozen_groups, seed=seed)


def lora_refreeze(named_params: Iterable[tuple[str, nn.Parameter]], lcfg: LoRAConfig | None,
                  frozen_groups: Iterable[str], family: str) -> None:
    """requires_grad as apply_lora set it (adapters, and lcfg.fully_trainable groups that are not frozen), for code
    that freezes by group only (train.optim.apply_freeze would unfreeze the base weights)."""
    if lcfg is None:
        return
    frozen, fam = set(frozen_groups), get_family(family)
    for name, p in named_params:
        g = fam.group_of(name)
        p.requires_grad_(is_adapter_key(name) or (g in lcfg.fully_trainable and g not in frozen))


def trainable_by_group(named_params: Iterable[tuple[str, torch.Tensor]], family: str) -> dict[str, int]:
    """{group: trainable elements} (adapters count in their projection's group); each shared tensor once."""
    fam, seen = get_family(family), set()
    out = {"vision": 0, "merger": 0, "llm": 0}
    for name, p in named_params:
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            out[fam.group_of(name)] += p.numel()
    return out


@torch.no_grad()
def reset_adapters(modules: Iterable[nn.Module]) -> int:
    """Fresh adapters (A from its name-seeded draw, B = 0; sharded factors get their slices) in this rank's model
    chunks: after loading weights that hold none (an HF directory, a checkpoint of a run without LoRA), so the run
    starts exactly at the loaded model. Returns the adapters reset."""
    n = 0
    for m in modules:
        for mod in lora_modules(m).values():
            mod.reset_lora_parameters()
            n += 1
    return n


def peft_base(adapter_dir: str | os.PathLike) -> Path:
    """The HF base directory a peft adapter directory names (adapter_config.json base_model_name_or_path), or a
    one-line ValueError when it is not an HF directory here."""
    import json

    from model.hf_adapter import is_hf_dir
    from model.lora_peft import CONFIG_FILE

    base = json.loads((Path(adapter_dir) / CONFIG_FILE).read_text()).get("base_model_name_or_path")
    if not base or not is_hf_dir(base):
        raise ValueError(f"model.init_from={adapter_dir} is a peft adapter whose base_model_name_or_path={base!r} is "
                         "not an HF directory here (config.json + safetensors); set it in the adapter's "
                         f"{CONFIG_FILE} to the base model's local directory")
    return Path(base)


def peft_init_state(mcfg: ModelConfig, lcfg: LoRAConfig | None, adapter_dir: str | os.PathLike
                    ) -> dict[str, torch.Tensor]:
    """A peft adapter directory as whole tensors by our keys (adapters, modules_to_save), checked against the
    recipe's lora section on a meta-device model: what the trainer loads over an init_from that is one."""
    if lcfg is None:
        raise ValueError(f"model.init_from={adapter_dir} is a peft adapter directory, but the recipe has no lora: "
                         "section; add one with the adapter's targets, rank and alpha")
    with torch.device("meta"):
        shape = VLModel(mcfg)
    apply_lora(shape, lcfg)
    return peft_state_dict(shape, adapter_dir)


# ------------------------------------------------------------------------------------------ memory
def tp_local_numel(fqn: str, numel: int, tp: int, mcfg: ModelConfig) -> int:
    """Elements of parameter `fqn` one tp rank holds, by the family's roles (parallel/tensor_parallel.py): colwise
    weight and bias, rowwise weight, the vocab-parallel embedding and head split over tp; of an adapter, the factor
    on the split side (colwise: B, rowwise: A); everything else is whole on every rank."""
    if tp == 1:
        return numel
    if fqn in ("embed_tokens.weight", "lm_head.weight"):
        return math.ceil(numel / tp)
    plan = get_family(mcfg.family).plan(mcfg)
    parts = fqn.split(".")
    if parts[0] == "layers":
        roles, rest = plan.decoder_layer, parts[2:]
    elif parts[:2] == ["visual", "blocks"]:
        roles, rest = plan.vision_block, parts[3:]
    else:
        return numel
    factor = rest[-2] if len(rest) >= 3 and rest[-2] in ("lora_A", "lora_B") else None
    path = ".".join(rest[:-2] if factor else rest[:-1])
    role, kind = roles.get(path), rest[-1]
    if factor is not None:
        split = (role == "colwise" and factor == "lora_B") or (role == "rowwise" and factor == "lora_A")
    else:
        split = role == "colwise" or (role == "rowwise" and kind == "weight")
    return math.ceil(numel / tp) if split else numel


def rank_memory(module: nn.Module, tp: int, dp: int, mixed_precision: str = "bf16") -> dict[str, int]:
    """Bytes per rank of one pipeline stage's parameters, gradients and AdamW state under the engine's ZeRO-1 (the
    dry run's memory model, train/dry_run.py; trainable = requires_grad, so call it after freezing and LoRA):
    bf16 params 2N + 4N/dp, grads 2G + 4G/dp; fp32 params 4N + 4N/dp, grads 4G + 4G/dp; AdamW 8G/dp, where N and
    G are the rank's parameter and trainable elements after the tp split (`module`: a single-device stage, e.g. on
    the meta device)."""
    mcfg = module.cfg
    n = g = 0
    seen: set[int] = set()
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        k = tp_local_numel(name, p.numel(), tp, mcfg)
        n += k
        g += k if p.requires_grad else 0
    low = 2 if mixed_precision == "bf16" else 4
    return {"params": low * n + 4 * n // dp, "grads": low * g + 4 * g // dp,
            "optimizer": 8 * g // dp, "local_params": n, "local_trainable": g}
