"""LoRA adapters in peft's file format, both ways: `adapter_config.json` + `adapter_model.safetensors` that
`peft.PeftModel.from_pretrained(<transformers model>, dir)` loads, and such a directory read into our adapters.

Keys: peft stores `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` under transformers' in-memory module
names (`model.language_model.layers.0.self_attn.q_proj`, `model.visual.blocks.0.attn.qkv`); we write that layout
and read it or the hub layout (model/hf_adapter.py's key mapping).

The ViT attention: HF fuses q/k/v into one `qkv` projection, we keep three (tensor parallelism shards them
column-wise), each with its own adapter. k adapted projections of one block are written as ONE adapter of rank
k * r on `qkv`: A = [A_q; A_k; A_v] stacked, B block-diagonal (B_q in q's rows and A_q's columns, zeros elsewhere),
so B A = [B_q A_q; B_k A_k; B_v A_v] exactly; its alpha in `alpha_pattern` keeps the scale (alpha * k, or
alpha * sqrt(k) with rslora). Reading takes such a block-diagonal adapter apart exactly, and a plain rank-r qkv
adapter (peft's own, A shared by q/k/v) as A copied to each and B's row blocks: the same function.

Groups trained in full (lora.fully_trainable, e.g. the merger) go to peft's `modules_to_save`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.hf_adapter import (
    CheckpointMismatchError,
    from_hf_state_dict,
    hf_source,
    normalize_hf_key,
    to_hf_state_dict,
    to_layout,
)
from model.lora import LoRAConfig, is_adapter_key, lora_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_QKV = ("q_proj", "k_proj", "v_proj")


def is_peft_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def _hf_module(name: str, cfg: ModelConfig) -> tuple[str, int | None]:
    """(transformers' in-memory module name, q/k/v index in a fused qkv or None) of our projection `name`."""
    key, row, fused = hf_source(f"{name}.weight", cfg)
    module = to_layout(key, "transformers5")[: -len(".weight")]
    return module, (row // cfg.vision.embed_dim if fused else None)


def _hf_module_of_path(path: str) -> str:
    """transformers' in-memory name of one of our (non-projection) module paths."""
    if path.startswith("visual") or path == "lm_head":
        return to_layout(path, "transformers5")
    return f"model.language_model.{path}"


# ------------------------------------------------------------------------------------------ writing
def to_peft(adapters: Mapping[str, torch.Tensor], cfg: ModelConfig, lcfg: LoRAConfig,
            full: Mapping[str, torch.Tensor] | None = None, modules_to_save: list[str] | None = None,
            ) -> tuple[dict[str, torch.Tensor], dict]:
    """(peft tensors, adapter_config.json dict) from our adapter factors (`<linear>.lora_A/B.weight`) and the
    fully trained parameters `full` (our keys) of the modules `modules_to_save` (our module paths)."""
    by_module: dict[str, dict[int | None, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in sorted(adapters):
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            module, part = _hf_module(name, cfg)
            by_module.setdefault(module, {})[part] = (adapters[key], adapters[f"{name}.lora_B.weight"])
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for module, parts in by_module.items():
        if None in parts:
            A, B = parts[None]
        else:  # a fused ViT qkv: block-diagonal adapter of rank k * r (see the module doc)
            A, B = _fuse_qkv(parts, cfg.vision.embed_dim)
            k = len(parts)
            if k > 1:
                rank_pattern[re.escape(module)] = A.shape[0]
                alpha_pattern[re.escape(module)] = lcfg.alpha * (math.sqrt(k) if lcfg.rslora else k)
        tensors[f"{PREFIX}{module}.lora_A.weight"] = A.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = B.contiguous()
    for key, t in to_hf_state_dict(dict(full or {}), cfg.text.tie_word_embeddings, "transformers5").items():
        tensors[PREFIX + key] = t.contiguous()
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "r": lcfg.rank, "lora_alpha": lcfg.alpha, "lora_dropout": lcfg.dropout, "use_rslora": lcfg.rslora,
        "target_modules": sorted(by_module), "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "modules_to_save": [_hf_module_of_path(m) for m in modules_to_save] if modules_to_save else None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_dora": False,
    }
    return tensors, config


def _fuse_qkv(parts: dict[int | None, tuple[torch.Tensor, torch.Tensor]], C: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = sorted(parts)
    A = torch.cat([parts[i][0] for i in order])
    B = parts[order[0]][1].new_zeros(3 * C, A.shape[0])
    col = 0
    for i in order:
        a, b = parts[i]
        B[i * C : (i + 1) * C, col : col + a.shape[0]] = b
        col += a.shape[0]
    return A, B


def covering_modules(model: nn.Module, groups: list[str]) -> list[str]:
    """The fewest module paths whose parameters are exactly those of `groups` (by the family's group_of); never a
    ModuleList / ModuleDict (peft's modules_to_save wraps modules that run, not containers: Qwen3-VL's DeepStack
    mergers are listed one by one)."""
    from model.family import get_family

    family = get_family(model.cfg.family)
    out: list[str] = []
    for path, mod in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in out):
            continue
        names = [f"{path}.{n}" for n, _ in mod.named_parameters()]
        if isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
            continue
        if names and all(family.group_of(n) in groups and not is_adapter_key(n) for n in names):
            out.append(path)
    return out


def save_peft_adapter(model: nn.Module, lcfg: LoRAConfig, out_dir: str | os.PathLike,
                      base_model: str | None = None) -> list[Path]:
    """Write the adapters (and lcfg.fully_trainable groups as modules_to_save) of a single-device LoRA model."""
    sd = model.state_dict()
    adapters = {k: v for k, v in sd.items() if is_adapter_key(k)}
    keep = covering_modules(model, lcfg.fully_trainable) if lcfg.fully_trainable else []
    full = {k: v for k, v in sd.items() if any(k.startswith(m + ".") for m in keep)}
    return write_peft_dir(adapters, model.cfg, lcfg, out_dir, full, keep, base_model)


def write_peft_dir(adapters: Mapping[str, torch.Tensor], cfg: ModelConfig, lcfg: LoRAConfig,
                   out_dir: str | os.PathLike, full: Mapping[str, torch.Tensor] | None = None,
                   modules_to_save: list[str] | None = None, base_model: str | None = None) -> list[Path]:
    """adapter_model.safetensors + adapter_config.json (world-readable, written atomically)."""
    from safetensors.torch import save_file

    if not adapters:
        raise ValueError("no LoRA adapters to write: this model / checkpoint has none (train with a lora: section)")
    tensors, config = to_peft(adapters, cfg, lcfg, full, modules_to_save)
    config["base_model_name_or_path"] = base_model
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, write in ((WEIGHTS_FILE, lambda p: save_file({k: v.detach().cpu().contiguous() for k, v in
                                                             tensors.items()}, str(p), metadata={"format": "pt"})),
                        (CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))):
        tmp = out / (name + ".tmp")
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out / name)
        files.append(out / name)
    return files


# ------------------------------------------------------------------------------------------ reading
def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first pattern that
    matches the end of the module name."""
    for pat, value in patterns.items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return value
    return default


def read_peft_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors under their stored keys) of a peft adapter directory."""
    from safetensors.torch import load_file

    d = Path(path)
    if not is_peft_dir(d):
        raise FileNotFoundError(f"{d} is not a peft adapter directory (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads((d / CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{d / CONFIG_FILE}: peft_type={config.get('peft_type')!r}; only LORA adapters are read")
    for key in ("use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise ValueError(f"{d / CONFIG_FILE}: {key}=true is not supported (plain LoRA only)")
    return config, load_file(str(d / WEIGHTS_FILE))


@torch.no_grad()
def load_peft_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Copy a peft adapter directory into a LoRA model's adapters (and its modules_to_save into the fully trained
    modules), in place; checked first by peft_state_dict (nothing is copied from an adapter that does not fit).
    Returns {'adapters': n, 'full': n} of tensors copied."""
    sd = peft_state_dict(model, path)
    params = dict(model.named_parameters())
    for k, t in sd.items():
        params[k].copy_(t.to(params[k].dtype))
    n_adapters = sum(is_adapter_key(k) for k in sd)
    return {"adapters": n_adapters, "full": len(sd) - n_adapters}


def peft_state_dict(model: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A peft adapter directory as our keys (`<linear>.lora_A/B.weight`, and the modules_to_save tensors), whole
    tensors, checked against a LoRA model's adapters (`model` may be on the meta device: only its shapes, ranks
    and scales are read). Every adapter of the model must be in the file with its shape and scale, and the file
    may hold no other module: the first mismatch is a one-line error naming the module (an adapter for another
    base model, or another lora config)."""
    config, stored = read_peft_dir(path)
    cfg, ours = model.cfg, lora_modules(model)
    r0, a0, rs = config["r"], config["lora_alpha"], bool(config.get("use_rslora"))
    values: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.match(r"^(.*)\.lora_([AB])\.weight$", k)
        if m is None:
            full[normalize_hf_key(k)] = t
            continue
        module, which = m[1], m[2]
        r = _pattern_value(config.get("rank_pattern") or {}, module, r0)
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, a0)
        scales[module] = alpha / (math.sqrt(r) if rs else r)
        values[f"{module}|{which}"] = t
    expected = {}
    for name, mod in ours.items():
        hf, part = _hf_module(name, cfg)
        expected.setdefault(hf, {})[part] = (name, mod)
    hub = {normalize_hf_key(k.split("|")[0]): k.split("|")[0] for k in values}
    plan = []
    for hf_module in sorted(set(expected) | {_to_ours_layout(h) for h in hub}):
        src = hub.get(normalize_hf_key(hf_module))
        if src is None:
            name = sorted(n for n, _ in expected[hf_module].values())[0]
            raise CheckpointMismatchError(f"peft adapter {path} has no adapter for {hf_module} (ours: {name}); it was "
                                          "trained with other target modules: set the lora targets to match")
        if hf_module not in expected:
            raise CheckpointMismatchError(f"peft adapter {path} has an adapter on {src}, which this model's lora "
                                          "config does not target (or this model lacks): set the lora targets to match")
        plan += _split_module(expected[hf_module], values[f"{src}|A"], values[f"{src}|B"], scales[src], src, path, cfg)
    out = {}
    for name, a, b in plan:
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = a, b
    return {**out, **_full_tensors(model, full, path)}


def _to_ours_layout(hub_module: str) -> str:
    """A hub-layout module name in the in-memory layout _hf_module gives (model.language_model.*, model.visual.*)."""
    return to_layout(hub_module, "transformers5")


def _split_module(ours: dict[int | None, tuple[str, nn.Module]], A: torch.Tensor, B: torch.Tensor, scale: float,
                  src: str, path, cfg: ModelConfig) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """One peft module's A, B as (our projection's name, A, B) for each of our adapters (three for a fused ViT qkv),
    checked against their shapes and scales."""
    C = cfg.vision.embed_dim
    out = []
    parts = {p: m.rank for p, (_, m) in ours.items() if p is not None}
    for part, (name, mod) in ours.items():
        a, b = (A, B) if part is None else (A, B[part * C : (part + 1) * C])
        if part is not None and A.shape[0] == sum(parts.values()) != mod.rank:
            # Block-diagonal (our export): this projection's columns; the others must be zero in its rows.
            col = sum(r for p, r in parts.items() if p < part)
            outside = torch.cat([b[:, :col], b[:, col + mod.rank :]], dim=1)
            if outside.numel() and outside.abs().max() > 0:
                raise CheckpointMismatchError(
                    f"peft adapter {path}: {src} (rank {A.shape[0]}) is not block-diagonal over q/k/v, so it cannot "
                    f"be split into rank-{mod.rank} adapters of {name}; set lora.rank to {A.shape[0]}")
            a, b = A[col : col + mod.rank], b[:, col : col + mod.rank]
        want_a, want_b = tuple(mod.lora_A.weight.shape), tuple(mod.lora_B.weight.shape)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise CheckpointMismatchError(
                f"peft adapter {path} does not fit this model: {src} has lora_A {tuple(A.shape)} / lora_B "
                f"{tuple(B.shape)}, {name} needs {want_a} / {want_b} (an adapter for another base model or rank)")
        if not math.isclose(scale, mod.scaling, rel_tol=1e-6):
            raise CheckpointMismatchError(
                f"peft adapter {path}: {src} scales by {scale:g} (lora_alpha / r), {name} by {mod.scaling:g}; set "
                "lora.alpha, lora.rank and lora.rslora as the adapter's adapter_config.json")
        out.append((name, a, b))
    return out


def _full_tensors(model: nn.Module, hub_tensors: dict[str, torch.Tensor], path) -> dict[str, torch.Tensor]:
    """The adapter's modules_to_save tensors (hub-layout keys) as our keys, checked against the model's shapes."""
    if not hub_tensors:
        return {}
    ours = from_hf_state_dict(hub_tensors, model.cfg.text.tie_word_embeddings)
    params = dict(model.named_parameters())
    for k, t in ours.items():
        if k not in params or tuple(params[k].shape) != tuple(t.shape):
            here = tuple(params[k].shape) if k in params else "no such key"
            raise CheckpointMismatchError(f"peft adapter {path}: saved module tensor {k} {tuple(t.shape)} does not "
                                          f"fit this model ({here})")
    return dict(ours)
