"""Which architecture, and which initial weights: presets, HF directories, our checkpoints (stage hand-off).

- `resolve_model_config(cfg)`: the ModelConfig of a run from model.preset / model.hf_config / model.init_from,
  plus model.overrides; when init_from names weights, their architecture must match (an error lists every
  differing field).
- HF directories are read by model.hf_adapter (`load_hf_slices`: this rank's shards only, so a 72B start on 256
  GPUs never materializes the full model in any process);
- `load_checkpoint_weights(modules, ckpt)`: model weights only from one of our DCP checkpoints, under whatever
  layout this run uses (DCP reshards); the stage hand-off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import typing
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from core.config import ConfigError, coerce, unknown_key_error
from model.config import ModelConfig, get_preset
from model.hf_adapter import is_hf_dir, read_hf_config
from model.lora import is_adapter_key
from model.lora_peft import is_peft_dir
from model.qwen2_vl import Qwen2VL
from train.checkpoint import checkpoint_keys, is_complete, load_state, read_meta, resolve_checkpoint
from train.state import ModelState

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ architecture
def _hf_config(path: str | Path) -> ModelConfig:
    try:
        return read_hf_config(path)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e


def _apply_overrides(mcfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """model.overrides ({dotted ModelConfig key: value}) through the same strict checks as every recipe key."""
    for key, value in overrides.items():
        parts = key.split(".")
        obj: Any = mcfg
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                raise unknown_key_error(".".join(["model.overrides", *parts[:i]]), part, names)
            if i < len(parts) - 1:
                obj = getattr(obj, part)
            else:
                tp = typing.get_type_hints(type(obj))[part]
                setattr(obj, part, coerce(value, tp, f"model.overrides.{key}"))
    try:
        mcfg.validate()
    except ValueError as e:
        raise ConfigError(f"model.overrides give an invalid model: {e}") from e
    return mcfg


def config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields that differ (attention backend excluded: a runtime choice, not an architecture)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    out = []
    for sec in ("vision", "text"):
        for k in da[sec]:
            va, vb = da[sec][k], db[sec][k]
            if isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple)):
                va, vb = list(va), list(vb)
            if va != vb:
                out.append(f"{sec}.{k}: {da[sec][k]} vs {db[sec][k]}")
    for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if da[k] != db[k]:
            out.append(f"{k}: {da[k]} vs {db[k]}")
    return out


def checkpoint_model_config(path: Path) -> ModelConfig:
    """The architecture stored in one of our checkpoints (meta.json's HF-style model config)."""
    meta = read_meta(path)
    if "model_config" not in meta:
        raise ConfigError(f"{path}/meta.json has no model_config")
    return ModelConfig.from_hf_dict(meta["model_config"])


def resolve_model_config(
    model_section: Any, resume_from: Path | None = None, require_init: bool = True
) -> ModelConfig:
    """The run's architecture (see the module doc). `resume_from` (a checkpoint this run resumes) must match.

    require_init=False (dry runs on a laptop): an init_from path that does not exist here is not read; the
    architecture then comes from the preset / hf_config alone."""
    m = model_section
    if m.preset is not None and m.hf_config is not None:
        raise ConfigError("model: set either model.preset or model.hf_config, not both")
    source_cfg: ModelConfig | None = None
    source = None
    if m.init_from is not None and (require_init or Path(m.init_from).exists()):
        p = Path(m.init_from)
        if is_peft_dir(p):  # a peft adapter directory: the architecture of the HF base it names
            from train.lora import peft_base

            source_cfg, source = _hf_config(peft_base(p)), f"the HF base of peft adapter {p}"
        elif is_hf_dir(p):
            source_cfg, source = _hf_config(p), f"HF directory {p}"
        else:
            try:
                ck = resolve_checkpoint(p)
            except FileNotFoundError as e:
                raise ConfigError(f"model.init_from={m.init_from!r}: not an HF directory and {e}") from e
            source_cfg, source = checkpoint_model_config(ck), f"checkpoint {ck}"
    if m.preset is not None:
        try:
            mcfg = get_preset(m.preset)
        except ValueError as e:
            raise ConfigError(f"model.preset: {e}") from e
    elif m.hf_config is not None:
        mcfg = _hf_config(m.hf_config)
    elif source_cfg is not None:
        mcfg = dataclasses.replace(source_cfg)
    else:
        raise ConfigError("model: set model.preset, model.hf_config or model.init_from (an HF directory)")
    mcfg = _apply_overrides(mcfg, dict(m.overrides))
    for what, other in ((source, source_cfg), (f"resumed checkpoint {resume_from}", None)):
        if what is None or (other is None and resume_from is None):
            continue
        if other is None:
            other = checkpoint_model_config(resume_from)
        diff = config_diff(mcfg, other)
        if diff:
            raise ConfigError(
                f"the model of this recipe differs from the {what}: " + "; ".join(diff[:10])
                + " (set model.preset/overrides to match, or set model.preset: null to take its architecture)"
            )
    return mcfg


def meta_model(mcfg: ModelConfig) -> Qwen2VL:
    """The model on the meta device without running any init: random init of meta tensors does nothing useful
    and takes seconds at 72B (torch decomposes every normal_/uniform_ call)."""
    noop = lambda self, *a, **k: None  # noqa: E731
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.device("meta"))
        stack.enter_context(mock.patch.object(Qwen2VL, "init_weights", noop))
        for cls in (nn.Linear, nn.Embedding, nn.LayerNorm, nn.modules.conv._ConvNd):
            stack.enter_context(mock.patch.object(cls, "reset_parameters", noop))
        return Qwen2VL(mcfg)


# ------------------------------------------------------------------------------------------ hand-off
@torch.no_grad()
def load_checkpoint_weights(modules: list[nn.Module], path: str | Path, process_group=None) -> bool:
    """Model weights only from one of our checkpoints (any layout) into this rank's stage modules, in place.
    Returns whether LoRA adapters were loaded: a LoRA model takes a checkpoint without adapters (its base weights;
    the caller starts fresh adapters), a model without adapters refuses a LoRA run's checkpoint."""
    ck = resolve_checkpoint(path)
    model = ModelState(modules)
    keys = checkpoint_keys(ck)
    own = model.state_dict()
    stored_adapters = any(k.startswith("model.") and is_adapter_key(k) for k in keys)
    own_adapters = any(is_adapter_key(k) for k in own)
    if stored_adapters and not own_adapters:
        raise ConfigError(f"checkpoint {ck} is a LoRA run's (it holds adapters) and this recipe has no lora: section: "
                          f"export it merged (python -m train.export {ck} DIR --lora merged) and start from DIR, or "
                          "add the run's lora: section to continue its adapters")
    needed = [k for k in own if stored_adapters or not is_adapter_key(k)]  # fresh adapters over a plain checkpoint
    absent = sorted(f"model.{k}" for k in needed if f"model.{k}" not in keys)
    if absent:
        raise ConfigError(f"checkpoint {ck} lacks {len(absent)} model tensors, e.g. {absent[:5]}")
    if own_adapters and not stored_adapters:
        base = {f"model.{k}": v for k, v in own.items() if not is_adapter_key(k)}
        load_state(ck, base, process_group)
        for m in modules:
            mine = {k: base[f"model.{k}"] for k in get_model_state_dict(m) if f"model.{k}" in base}
            set_model_state_dict(m, mine, options=StateDictOptions(strict=False))
    else:
        load_state(ck, {"model": model}, process_group)
    log.info("initialized the model from checkpoint %s", ck)
    return stored_adapters


def describe_init(path: str | Path) -> str:
    p = Path(path)
    if is_hf_dir(p):
        return f"HF directory {p}"
    if is_peft_dir(p):
        return f"peft adapter {p} over its base model"
    ck = resolve_checkpoint(p)
    return f"checkpoint {ck} (step {read_meta(ck)['step']})" if is_complete(ck) else str(ck)
