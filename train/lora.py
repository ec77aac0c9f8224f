"""LoRA in a training run: what the trainer, the dry run and the metrics call. The recipe section `lora:` is
model.lora.LoRAConfig (null = full training); model/lora.py holds the adapters themselves.

    targets = apply_recipe_lora(model, lcfg, frozen_groups, seed)   # trainer: after freezing, before parallelize
    reset_adapters(engine.modules)                                   # weights loaded without adapters: fresh ones
    peft_init_state(mcfg, lcfg, adapter_dir)                         # init_from a peft adapter directory
    trainable_by_group(model.named_parameters(), family)             # the start event and the metrics line

The dry run (train/dry_run.py: rank_numel, from the family's tp roles) counts an adapter factor's share
per rank. The export tool (tools/export.py --lora merged|adapter) folds the adapters in or writes peft's format
(model/lora_peft.py). The optimizer needs nothing of its own: it takes the parameters that require grad, which
after apply_lora are the adapters (grouped with their projection's group, so lr_<group> applies) and the groups in
lora.fully_trainable. Checkpoints need nothing either: the adapters are parameters with stable names
(`<linear>.lora_A.weight`), so DCP saves, reshards and resumes them with the rest, and a LoRA run's checkpoint
continues into a LoRA recipe.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.family import get_family
from model.lora import LoRAConfig, apply_lora, lora_modules
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
