"""The model-family seam: what a family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) declares, and the registry.

Every family lives in one folder under model/ (model/qwen2_vl/, model/qwen2_5_vl/, model/qwen3_vl/), builds on
the blocks they share (model/text.py, model/vision.py, model/vlm.py) and ends in one `FAMILY = ModelFamily(...)`.
The rest of the framework asks the declaration instead of naming a family's modules:

- model/: the modules (`build_vision`), presets, the HF config mapping both ways and detection from config.json,
  the key layout it writes, its processor facts (`processing`: patch / merge / temporal patch sizes, pixel
  normalization, image pixel bounds, how video time is encoded, the chat template's default system prompt) and
  position ids (model/processing.py);
- parallel/: the tensor/sequence-parallel roles of each block's submodules (`plan`), which blocks are activation
  checkpointing / compile / FSDP units and which decoder layers form the pipeline (`vision_blocks`,
  `decoder_layers`, `top_modules`), and how many decoder layers must stay in pipeline stage 0 (DeepStack);
- train/: the parameter groups (`group_of`: vision / merger / llm, every parameter in exactly one) and FLOPs
  (model/flops.py reads the config).

NOTE: roles are names, not torch ParallelStyles, so model/ imports nothing from torch.distributed; parallel/
turns them into styles (parallel/tensor_parallel.py).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch.nn as nn

    from model.config import ModelConfig
    from model.processing import VisionProcessing

GROUPS = ("vision", "merger", "llm")
"""Parameter groups, in the order the recipes name them: the ViT (with its position table), the mergers that project
its features into the LLM (the patch merger, Qwen3-VL's DeepStack mergers), the LLM (embeddings, decoder, final
norm, head)."""

TP_ROLES = ("colwise", "rowwise", "norm", "gather_input", "head_norm")
"""Tensor/sequence-parallel roles a plan may give a submodule (parallel/tensor_parallel.py applies them):
colwise / rowwise: the Megatron linear split (a rowwise output is sequence-sharded under SP); norm: runs on the
sequence shard under SP; gather_input: its first input is gathered from the sequence shards under SP (attention
and MLP need whole sequences / all rows); head_norm: a norm over each head of a colwise output (Qwen3's QK-norm):
replicated weights whose gradients are partial sums over the tp ranks' heads."""


@dataclass(frozen=True)
class ParallelPlan:
    """TP/SP roles by submodule path, relative to one ViT block or one decoder layer (roles in TP_ROLES)."""

    vision_block: Mapping[str, str]
    decoder_layer: Mapping[str, str]
    vision_gather: tuple[str, ...] = ("visual.merger",)
    """Top-level modules (FQNs) that take the ViT's output rows and need all of them (the mergers)."""


def decoder_layer_roles(qk_norm: bool) -> dict[str, str]:
    """The decoder layer's roles (Qwen2 and Qwen3 decoders; Qwen3 adds its QK-norm)."""
    roles = {
        "input_layernorm": "norm", "self_attn": "gather_input",
        "self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
        "self_attn.o_proj": "rowwise",
        "post_attention_layernorm": "norm", "mlp": "gather_input",
        "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "mlp.down_proj": "rowwise",
    }
    if qk_norm:
        roles |= {"self_attn.q_norm": "head_norm", "self_attn.k_norm": "head_norm"}
    return roles


def vision_block_roles(mlp: Mapping[str, str]) -> dict[str, str]:
    """A ViT block's roles: norm1 / attn / norm2 / mlp, with the family's MLP projections."""
    return {
        "norm1": "norm", "attn": "gather_input",
        "attn.q_proj": "colwise", "attn.k_proj": "colwise", "attn.v_proj": "colwise", "attn.o_proj": "rowwise",
        "norm2": "norm", "mlp": "gather_input", **{f"mlp.{k}": v for k, v in mlp.items()},
    }


def _no_checks(cfg: ModelConfig) -> None:  # noqa: ARG001
    return None


@dataclass(frozen=True)
class ModelFamily:
    """Everything the framework needs to know about one model family (see the module doc)."""

    name: str
    """Registry name, as in recipes (`model.family`): e.g. 'qwen2_vl'."""
    title: str
    """Human name for messages: e.g. 'Qwen2-VL'."""
    hf_model_types: tuple[str, ...]
    """config.json `model_type` values this family reads."""
    hf_architecture: str
    """transformers class (config.json `architectures`), e.g. 'Qwen2VLForConditionalGeneration'."""
    presets: Mapping[str, Callable[[], ModelConfig]]
    """Architecture presets by name ('tiny' plus the published sizes)."""
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    """Our config -> the family's transformers config.json."""
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    """A transformers config.json of this family -> our config (raise ValueError on what we do not implement)."""
    build_vision: Callable[[ModelConfig], nn.Module]
    """The vision tower (ViT + merger [+ DeepStack mergers]): forward(pixels_NP, grid_thw) -> (tokens_MD, [deep_MD])."""
    processing: Callable[[ModelConfig], VisionProcessing]
    """Processor facts and position ids for this config (model/processing.py)."""
    plan: Callable[[ModelConfig], ParallelPlan]
    """Tensor/sequence-parallel roles."""
    validate: Callable[[ModelConfig], None] = _no_checks
    """Family-specific config checks (ValueError naming the field)."""
    hf_write_layout: Literal["hub", "transformers5"] = "hub"
    """Key layout of the checkpoints we write: 'hub' (`visual.*`, `model.*`) as the released Qwen2-VL / Qwen2.5-VL
    checkpoints, or 'transformers5' (`model.visual.*`, `model.language_model.*`) as the released Qwen3-VL ones."""
    group_prefixes: tuple[tuple[str, str], ...] = (("visual.merger.", "merger"), ("visual.", "vision"))
    """Parameter groups by FQN prefix, first match wins; everything else is 'llm'."""
    unsupported_hf: Mapping[str, str] = field(default_factory=dict)
    """config.json model_types that resemble this family but are refused, with the one-line reason."""

    # ---------------------------------------------------------------- what the engine reads
    def group_of(self, fqn: str) -> str:
        """The parameter group ('vision', 'merger' or 'llm') of a parameter name."""
        for prefix, group in self.group_prefixes:
            if fqn.startswith(prefix):
                return group
        return "llm"

    def stage0_decoder_layers(self, cfg: ModelConfig) -> int:
        """Decoder layers that must sit in pipeline stage 0 with the ViT: those DeepStack adds vision features to."""
        return len(cfg.vision.deepstack_visual_indexes)


# ------------------------------------------------------------------------------------------ registry
_MODULES = {"qwen2_vl": "model.qwen2_vl", "qwen2_5_vl": "model.qwen2_5_vl", "qwen3_vl": "model.qwen3_vl"}
FAMILY_NAMES = tuple(_MODULES)
"""Every supported family."""
DEFAULT_FAMILY = "qwen2_vl"
"""The family of a recipe or config that names none (the framework's first)."""

# config.json model_types that are refused with a reason instead of "unknown".
_REFUSED = {
    "qwen3_vl_moe": "Qwen3-VL MoE checkpoints need expert parallelism, which this framework does not implement "
                    "(only the dense Qwen3-VL models are supported)",
    "qwen3_5": "Qwen3.5 checkpoints are not supported (a different architecture: linear attention layers)",
    "qwen3_5_moe": "Qwen3.5 MoE checkpoints are not supported (linear attention layers and experts)",
    "qwen2_5_omni": "Qwen2.5-Omni checkpoints are not supported (audio and talker towers)",
    "qwen3_omni_moe": "Qwen3-Omni checkpoints are not supported (audio towers and experts)",
}


def get_family(name: str) -> ModelFamily:
    """The declaration of family `name`; a did-you-mean ValueError for an unknown name."""
    mod = _MODULES.get(name)
    if mod is None:
        close = difflib.get_close_matches(str(name), FAMILY_NAMES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model family {name!r}{hint}; supported: {', '.join(FAMILY_NAMES)}")
    return importlib.import_module(mod).FAMILY


def all_families() -> list[ModelFamily]:
    return [get_family(n) for n in FAMILY_NAMES]


def check_config(cfg: ModelConfig) -> None:
    """Every check of an architecture: the shapes every family shares (ModelConfig.validate), then its family's."""
    cfg.validate()
    get_family(cfg.family).validate(cfg)


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The family's transformers config.json for this architecture."""
    return get_family(cfg.family).config_to_hf(cfg)


def config_from_hf_dict(d: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Read a transformers config.json of any supported family (detected from its model_type), checked."""
    cfg = family_of_hf_config(d, source).config_from_hf(dict(d))
    check_config(cfg)
    return cfg


def family_of_hf_config(d: Mapping[str, Any], source: str = "config.json") -> ModelFamily:
    """The family of a transformers config.json (by `model_type`), or a one-line ValueError naming the source, the
    key and the supported families."""
    mt = d.get("model_type")
    for fam in all_families():
        if mt in fam.hf_model_types:
            return fam
    supported = ", ".join(f"{t!r} ({f.title})" for f in all_families() for t in f.hf_model_types)
    if mt in _REFUSED:
        raise ValueError(f"{source}: model_type={mt!r}: {_REFUSED[mt]}; supported model_types: {supported}")
    raise ValueError(f"{source}: model_type={mt!r} is not a supported model family; supported model_types: "
                     f"{supported}")


def get_preset(family: str, name: str) -> ModelConfig:
    """A fresh, validated preset config of `family` by name; a did-you-mean ValueError listing the presets."""
    fam = get_family(family)
    make = fam.presets.get(str(name).lower())
    if make is None:
        close = difflib.get_close_matches(str(name).lower(), list(fam.presets), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown {fam.title} preset {name!r}{hint}; choose one of {', '.join(fam.presets)}")
    cfg = make()
    check_config(cfg)
    return cfg
