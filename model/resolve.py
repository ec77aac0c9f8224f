"""Which architecture a run trains: a family and preset, an HF config.json, or the weights it starts from; then the
recipe's `model.overrides`; and it must match every set of weights the run loads (the family first).

    resolve_model_config(section, init=("HF directory D", cfg), resumed=("resumed checkpoint C", cfg))

`section` is the recipe's model section (train/config.py ModelSection: family, preset, hf_config, overrides). The caller
reads the architectures of the weights (an HF directory's config.json with `hf_config`, a checkpoint's meta.json
dict with `checkpoint_config`) and says what they are; this module reads no checkpoint itself. Overrides go
through core.config's strict machinery, like every recipe key: an unknown key names its section and the valid
keys, a wrong type names the key and the expected type, and the result is validated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

from core.config import ConfigError, from_dict, set_dotted, to_dict
from model.config import ModelConfig
from model.family import DEFAULT_FAMILY, check_config, config_from_hf_dict, get_family, get_preset
from model.hf_adapter import read_hf_config

OVERRIDES = "model.overrides"


class ModelChoice(Protocol):
    """The recipe's model section as far as the architecture goes."""

    family: str | None
    preset: str | None
    hf_config: str | None
    overrides: dict[str, Any]


def hf_config(path: str | Path) -> ModelConfig:
    """The architecture of an HF directory (or its config.json) of any supported family; a one-line ConfigError when
    there is none or its model_type is not a supported family (naming the file, the key and the families)."""
    try:
        return read_hf_config(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e


def checkpoint_config(meta: dict[str, Any], where: str | Path) -> ModelConfig:
    """The architecture stored in one of our checkpoints: `meta` is its meta.json (`where` names it in errors)."""
    if "model_config" not in meta:
        raise ConfigError(f"{where}/meta.json has no model_config")
    try:
        return config_from_hf_dict(meta["model_config"], source=f"{where}/meta.json")
    except ValueError as e:
        raise ConfigError(str(e)) from e


def apply_overrides(mcfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """A new ModelConfig: `mcfg` with {dotted ModelConfig key: value} set, checked as recipe keys are."""
    if not overrides:
        return mcfg
    data = to_dict(mcfg)
    for key, value in overrides.items():
        set_dotted(data, key.split("."), value, ModelConfig, root=OVERRIDES)
    out = from_dict(ModelConfig, data, OVERRIDES)  # the shared checks (ModelConfig.validate)
    try:
        check_config(out)  # and the family's
    except ValueError as e:
        raise ConfigError(f"{OVERRIDES}: {e}") from e
    return out


def config_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """Fields that differ (attention backend excluded: a runtime choice, not an architecture)."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    out = [f"family: {a.family} vs {b.family}"] if a.family != b.family else []
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


def resolve_model_config(
    section: ModelChoice,
    init: tuple[str, ModelConfig] | None = None,
    resumed: tuple[str, ModelConfig] | None = None,
) -> ModelConfig:
    """The run's architecture: model.family's model.preset, else model.hf_config, else the init weights' own; plus
    overrides. `init` and `resumed` are (what, architecture) of the weights the run starts from: each must match,
    the family first. model.family, when not set, is the weights' (or hf_config's), else the default."""
    if section.preset is not None and section.hf_config is not None:
        raise ConfigError("model: set either model.preset or model.hf_config, not both")
    given = hf_config(section.hf_config) if section.hf_config is not None else None
    family = _family(section, given or (init[1] if init is not None else None))
    for weights, fix in ((init, None), (resumed, RESUMED_FIX)):
        if weights is None or weights[1].family == family:
            continue
        what, other = weights
        fix = fix or (f"start from weights of the recipe's family, or set model.family: {other.family} (or leave "
                      "it unset to take the weights' family)")
        raise ConfigError(f"the {what} is a {get_family(other.family).title} model ({other.family}) but this "
                          f"recipe's model.family is {family}: {fix}")
    if section.preset is not None:
        try:
            mcfg = get_preset(family, section.preset)
        except ValueError as e:
            raise ConfigError(f"model.preset: {e}") from e
    elif given is not None:
        mcfg = given
    elif init is not None:
        mcfg = init[1]
    else:
        raise ConfigError("model: set model.preset, model.hf_config or model.init_from (an HF directory)")
    mcfg = apply_overrides(mcfg, dict(section.overrides))
    for weights, fix in ((init, INIT_FIX), (resumed, RESUMED_FIX)):
        diff = config_diff(mcfg, weights[1]) if weights is not None else None
        if diff:
            raise ConfigError(f"the model of this recipe differs from the {weights[0]}: " + "; ".join(diff[:10])
                              + f" ({fix})")
    return mcfg


def _family(section: ModelChoice, weights: ModelConfig | None) -> str:
    """The recipe's model.family (checked: a did-you-mean error for an unknown name), else that of the weights or
    hf_config it starts from, else the default family."""
    if section.family is None:
        return weights.family if weights is not None else DEFAULT_FAMILY
    try:
        return get_family(section.family).name
    except ValueError as e:
        raise ConfigError(f"model.family: {e}") from e


INIT_FIX = "set model.preset/overrides to match, or set model.preset: null to take its architecture"
RESUMED_FIX = ("this run_dir belongs to a different run; pick a new run_dir (or checkpoint.dir), or "
               "checkpoint.resume=never in an empty one")
