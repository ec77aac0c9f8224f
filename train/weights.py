"""Which architecture, and which initial weights: presets, HF directories, our checkpoints (stage hand-off).

- `resolve_model_config(cfg)`: the ModelConfig of a run from model.preset / model.hf_config / model.init_from,
  plus model.overrides; when init_from names weights, their architecture must match (an error lists every
  differing field).
- `load_hf_weights(named_tensors, hf_dir)`: fills this rank's (possibly sharded) tensors straight from the
  safetensors files, reading only each local shard's slice (safe_open + get_slice), so a 72B start on 256
  GPUs never materializes the full model in any process.
- `load_checkpoint_weights(named_tensors, ckpt)`: model weights only from one of our DCP checkpoints, under
  whatever layout this run uses (DCP reshards); the stage hand-off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader

from model.config import ModelConfig, get_preset
from model.hf_adapter import INDEX_FILE, SINGLE_FILE, normalize_hf_key
from model.qwen2_vl import Qwen2VL
from train.cfgparse import ConfigError
from train.checkpoint import checkpoint_keys, is_complete, read_meta, resolve_checkpoint

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ architecture
def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file() or any(p.glob("*.safetensors"))
    )


def _hf_config(path: str | Path) -> ModelConfig:
    p = Path(path)
    f = p if p.suffix == ".json" else p / "config.json"
    if not f.is_file():
        raise ConfigError(f"no config.json at {path}")
    return ModelConfig.from_hf_dict(json.loads(f.read_text()))


def _apply_overrides(mcfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    for key, value in overrides.items():
        parts = key.split(".")
        obj: Any = mcfg
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(obj)]
            if part not in names:
                where = ".".join(parts[:i]) or "ModelConfig"
                raise ConfigError(
                    f"model.overrides: {key!r}: {where} has no field {part!r}; fields: {', '.join(names)}"
                )
            if i < len(parts) - 1:
                obj = getattr(obj, part)
            else:
                cur = getattr(obj, part)
                if isinstance(cur, tuple):
                    value = tuple(value)
                elif isinstance(cur, float) and isinstance(value, int):
                    value = float(value)
                elif not isinstance(value, type(cur)):
                    raise ConfigError(f"model.overrides.{key}: expected {type(cur).__name__}, got {value!r}")
                setattr(obj, part, value)
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
        if is_hf_dir(p):
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


# ------------------------------------------------------------------------------------------ shards
def _local_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(local tensor, its slice of the global tensor) for a plain tensor or a DTensor shard."""
    if hasattr(t, "to_local") and hasattr(t, "device_mesh"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return t, tuple(slice(0, n) for n in t.shape)


# HF source of each of our keys: (hf key in hub layout, row offset in it). Only the ViT's q/k/v differ.
def _hf_source(fqn: str, vision_width: int, tie: bool) -> tuple[str, int]:
    parts = fqn.split(".")
    if fqn.startswith("visual.blocks.") and parts[3] == "attn":
        proj, kind = parts[4], parts[5]
        if proj in ("q_proj", "k_proj", "v_proj"):
            off = {"q_proj": 0, "k_proj": 1, "v_proj": 2}[proj] * vision_width
            return f"visual.blocks.{parts[2]}.attn.qkv.{kind}", off
        if proj == "o_proj":
            return f"visual.blocks.{parts[2]}.attn.proj.{kind}", 0
    if fqn.startswith("visual."):
        return fqn, 0
    if fqn == "lm_head.weight":
        return ("model.embed_tokens.weight" if tie else "lm_head.weight"), 0
    return "model." + fqn, 0


@torch.no_grad()
def load_hf_weights(named_tensors: dict[str, torch.Tensor], hf_dir: str | Path, mcfg: ModelConfig) -> int:
    """Copy an HF Qwen2-VL checkpoint into this rank's tensors (plain or DTensor), reading only local slices.

    Returns the number of tensors filled. Raises ConfigError naming missing keys and shape mismatches.
    """
    from safetensors import safe_open

    d = Path(hf_dir)
    if (d / INDEX_FILE).is_file():
        weight_map = json.loads((d / INDEX_FILE).read_text())["weight_map"]
    else:
        files = [d / SINGLE_FILE] if (d / SINGLE_FILE).is_file() else sorted(d.glob("*.safetensors"))
        if len(files) != 1:
            raise ConfigError(f"{d}: expected {SINGLE_FILE}, {INDEX_FILE} or exactly one *.safetensors file")
        with safe_open(str(files[0]), framework="pt") as f:
            weight_map = {k: files[0].name for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    # Either key layout on disk -> the hub layout we address.
    hub = {normalize_hf_key(k): (k, fname) for k, fname in weight_map.items()}
    tie = mcfg.text.tie_word_embeddings
    by_file: dict[str, list[tuple[str, torch.Tensor, str, int, bool]]] = {}
    missing = []
    for fqn, t in named_tensors.items():
        key, off = _hf_source(fqn, mcfg.vision.embed_dim, tie)
        if key not in hub:
            missing.append(f"{fqn} (needs {key})")
            continue
        orig, fname = hub[key]
        by_file.setdefault(fname, []).append((fqn, t, orig, off, key.endswith((".qkv.weight", ".qkv.bias"))))
    if missing:
        raise ConfigError(f"HF checkpoint {d} lacks {len(missing)} tensors: {', '.join(missing[:8])}")
    n = 0
    for fname, items in by_file.items():
        with safe_open(str(d / fname), framework="pt") as f:
            for fqn, t, orig, off, fused in items:
                local, sl = _local_view(t)
                src = f.get_slice(orig)
                gshape = tuple(src.get_shape())
                want = tuple(t.shape)
                exp = (want[0] * 3, *want[1:]) if fused else want
                if gshape != exp:
                    raise ConfigError(f"{d}: {orig} has shape {gshape}, but {fqn} needs {exp}")
                rows = slice(sl[0].start + off, sl[0].stop + off) if sl else None
                part = src[(rows, *sl[1:])] if sl else src[:]
                local.copy_(part.to(local.dtype))
                n += 1
    log.info("loaded %d tensors from HF checkpoint %s", n, d)
    return n


# ------------------------------------------------------------------------------------------ hand-off
@torch.no_grad()
def load_checkpoint_weights(named_tensors: dict[str, torch.Tensor], path: str | Path, process_group=None) -> Path:
    """Model weights only from one of our checkpoints (any layout) into this rank's tensors, in place."""
    ck = resolve_checkpoint(path)
    keys = checkpoint_keys(ck)
    want = {f"model.{k}": v for k, v in named_tensors.items()}
    absent = sorted(k for k in want if k not in keys)
    if absent:
        raise ConfigError(f"checkpoint {ck} lacks {len(absent)} model tensors, e.g. {absent[:5]}")
    dcp.load(want, storage_reader=FileSystemReader(str(ck)), process_group=process_group)
    log.info("initialized %d tensors from checkpoint %s", len(want), ck)
    return ck


def describe_init(path: str | Path) -> str:
    p = Path(path)
    if is_hf_dir(p):
        return f"HF directory {p}"
    ck = resolve_checkpoint(p)
    return f"checkpoint {ck} (step {read_meta(ck)['step']})" if is_complete(ck) else str(ck)
