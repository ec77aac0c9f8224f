"""Hugging Face Qwen2-VL checkpoints <-> our modules: key conversion, loading, saving.

Key layouts read:
- hub layout (what the released checkpoints hold and transformers 4.x / 5.x `save_pretrained` writes):
  `visual.*`, `model.*` (decoder), `lm_head.*`;
- transformers >= 4.52 / 5.x in-memory layout (what `model.state_dict()` returns there, and what some
  re-saved checkpoints hold): `model.visual.*`, `model.language_model.*`, `lm_head.*`.
Written: the hub layout, which transformers 4.x and 5.x `from_pretrained` both load.

Ours differs only where tensor parallelism wants it: the ViT attention's fused `qkv` is split into q/k/v
projections (rows [q; k; v]) and `attn.proj` is called `attn.o_proj`; decoder keys lose the `model.` prefix.

Tied embeddings (2B): the hub checkpoint has no `lm_head.weight` (or a copy equal to the embedding); our
state dict carries `lm_head.weight` as the SAME tensor as `embed_tokens.weight`, because that is what
`Qwen2VL.state_dict()` returns for a tied model and what `load_state_dict(strict=True)` expects.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from model.config import ModelConfig

log = logging.getLogger(__name__)

_VIS_QKV = re.compile(r"^visual\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_VIS_PROJ = re.compile(r"^visual\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$")
_OUR_VIS_ATTN = re.compile(r"^visual\.blocks\.(\d+)\.attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # the hub's usual 5 GB shards

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the config: missing, unexpected or mis-shaped keys."""


# ------------------------------------------------------------------------------------------ key conversion
def normalize_hf_key(key: str) -> str:
    """Map any supported HF layout to the hub layout."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def _from_hf(
    sd: Mapping[str, torch.Tensor], tie_word_embeddings: bool
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """HF (either layout) -> ours, plus ours-key -> checkpoint-key for error messages."""
    out: dict[str, torch.Tensor] = {}
    src: dict[str, str] = {}
    lm_head: torch.Tensor | None = None
    for key, t in sd.items():
        k = normalize_hf_key(key)
        if k.endswith(".inv_freq"):
            # Old exports carry rotary buffers; they are derived from the config and recomputed by us.
            log.info("ignoring derived buffer %s in checkpoint", key)
            continue
        if m := _VIS_QKV.match(k):
            if t.shape[0] % 3:
                raise CheckpointMismatchError(f"{key}: fused qkv has {t.shape[0]} rows, not divisible by 3")
            base = f"visual.blocks.{m[1]}.attn"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[f"{base}.{name}.{m[2]}"] = part
                src[f"{base}.{name}.{m[2]}"] = f"{key} (rows of the fused qkv)"
        elif m := _VIS_PROJ.match(k):
            out[f"visual.blocks.{m[1]}.attn.o_proj.{m[2]}"] = t
            src[f"visual.blocks.{m[1]}.attn.o_proj.{m[2]}"] = key
        elif k.startswith("visual."):
            out[k], src[k] = t, key
        elif k.startswith("model."):
            out[k[len("model.") :]], src[k[len("model.") :]] = t, key
        elif k == "lm_head.weight":
            lm_head = t
            src[k] = key
        else:
            raise CheckpointMismatchError(
                f"unexpected key {key!r} in a Qwen2-VL checkpoint (known prefixes: visual., model., lm_head.)"
            )
    if tie_word_embeddings:
        emb = out.get("embed_tokens.weight")
        if lm_head is not None and emb is not None and (lm_head.shape != emb.shape or not torch.equal(lm_head, emb)):
            # transformers ties them too and drops the stored head: say so instead of losing it silently.
            log.warning("tie_word_embeddings=true but the checkpoint's lm_head.weight differs from "
                        "embed_tokens.weight; using embed_tokens.weight for both, as transformers does")
        if emb is not None:
            out["lm_head.weight"] = emb
            src["lm_head.weight"] = src["embed_tokens.weight"] + " (tied)"
    elif lm_head is not None:
        out["lm_head.weight"] = lm_head
    return out, src


def from_hf_state_dict(sd: Mapping[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """HF (either layout) -> ours. Tensors are not copied (q/k/v are views of the fused qkv).

    With tied embeddings the result holds `lm_head.weight` as the same tensor as `embed_tokens.weight`.
    """
    return _from_hf(sd, tie_word_embeddings)[0]


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    """Ours -> HF hub layout (q/k/v fused back into `qkv`; no `lm_head.weight` when tied)."""
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for k, t in sd.items():
        if m := _OUR_VIS_ATTN.match(k):
            if m[2] == "o_proj":
                out[f"visual.blocks.{m[1]}.attn.proj.{m[3]}"] = t
            else:
                pending.setdefault((m[1], m[3]), {})[m[2]] = t
        elif k.startswith("visual."):
            out[k] = t
        elif k == "lm_head.weight":
            if not tie_word_embeddings:
                out[k] = t
        else:
            out["model." + k] = t
    for (blk, kind), parts in pending.items():
        if len(parts) != 3:
            raise CheckpointMismatchError(
                f"visual.blocks.{blk}.attn {kind}: need q_proj, k_proj and v_proj to fuse qkv, got {sorted(parts)}"
            )
        out[f"visual.blocks.{blk}.attn.qkv.{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


# ------------------------------------------------------------------------------------------ validation
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict keys and shapes for `cfg` (built on the meta device: no memory, any size)."""
    from model.qwen2_vl import Qwen2VL  # local: qwen2_vl imports this module for from_hf

    with torch.device("meta"):
        model = Qwen2VL(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_state_dict(
    sd: Mapping[str, torch.Tensor], cfg: ModelConfig, source: Mapping[str, str] | None = None, what: str = "state dict"
) -> None:
    """Raise CheckpointMismatchError listing every missing, unexpected and mis-shaped key (ours layout)."""
    want = expected_shapes(cfg)
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in sd:
        want.pop("lm_head.weight", None)  # tied: the embedding is the head
    src = source or {}
    name = lambda k: f"{k} (checkpoint key {src[k]})" if k in src and src[k] != k else k  # noqa: E731
    missing = [k for k in want if k not in sd]
    unexpected = [name(k) for k in sd if k not in want]
    shapes = [
        f"{name(k)}: checkpoint {tuple(sd[k].shape)} vs config {want[k]}"
        for k in want
        if k in sd and tuple(sd[k].shape) != want[k]
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{what} does not match the Qwen2-VL config:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = items[:20]
            more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
            lines.append(f"  {title} ({len(items)}): " + "; ".join(shown) + more)
    lines.append("  (check that config.json belongs to these weights: layer counts, widths, vocab size)")
    raise CheckpointMismatchError("\n".join(lines))


# ------------------------------------------------------------------------------------------ files
def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def read_hf_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single `model.safetensors` or sharded with an index)."""
    d = Path(path)
    if not d.is_dir():
        raise FileNotFoundError(f"HF checkpoint directory {d} does not exist")
    index = d / INDEX_FILE
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not (d / shard).exists():
                raise FileNotFoundError(f"{index} lists shard {shard}, which is not in {d}")
            part = _read_safetensors(d / shard)
            listed = {k for k, v in weight_map.items() if v == shard}
            if absent := sorted(listed - part.keys()):
                raise CheckpointMismatchError(f"{index} maps {absent[:5]} to {shard}, which does not hold them")
            if extra := sorted(part.keys() - listed):
                log.warning("%s holds %d tensors the index does not list (e.g. %s); reading them anyway",
                            shard, len(extra), extra[0])
            tensors.update(part)
        return tensors
    if (d / SINGLE_FILE).exists():
        return _read_safetensors(d / SINGLE_FILE)
    others = sorted(p.name for p in d.glob("*.safetensors"))
    if len(others) == 1:
        return _read_safetensors(d / others[0])
    if any(d.glob("*.bin")):
        raise FileNotFoundError(
            f"{d} holds PyTorch .bin weights only; convert them to safetensors (transformers: "
            "model.save_pretrained(dir, safe_serialization=True)) and retry"
        )
    raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or single *.safetensors file in {d}")


def load_hf_checkpoint(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF Qwen2-VL directory (config.json + safetensors, either key layout) into our layout.

    Returns (config, state_dict) with state_dict ready for `Qwen2VL(config).load_state_dict(sd, strict=True)`.
    `dtype` casts floating tensors (None keeps the stored dtype). Raises CheckpointMismatchError naming every
    missing, unexpected or mis-shaped key.
    """
    d = Path(path)
    cfg_file = d / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: an HF checkpoint directory needs config.json")
    cfg = ModelConfig.from_hf_dict(json.loads(cfg_file.read_text()))
    hf_sd = read_hf_tensors(d)
    if dtype is not None:
        hf_sd = {k: t.to(dtype) if t.is_floating_point() else t for k, t in hf_sd.items()}
    sd, src = _from_hf(hf_sd, cfg.text.tie_word_embeddings)
    check_state_dict(sd, cfg, src, what=f"checkpoint {d}")
    return cfg, sd


def _to_plain_cpu(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # DTensor (TP/FSDP): gather the full tensor first
        t = t.full_tensor()
    t = t.detach().to("cpu")
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share storage: copy views (e.g. q/k/v rows of one qkv) out."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def write_safetensors_shards(
    tensors: Mapping[str, torch.Tensor], out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[Path]:
    """Write tensors (any key layout) as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` +
    `model.safetensors.index.json` when they exceed max_shard_bytes. Files are written under temporary names
    and renamed, and stale shards of an earlier save in out_dir are removed, so a reader never sees a mix."""
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[str]] = [[]]
    size = 0
    total = 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
        total += n
    names = (
        [SINGLE_FILE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(len(shards))]
    )
    written = []
    for name, keys in zip(names, shards):
        tmp = out / (name + ".tmp")
        save_file({k: _own_storage(tensors[k]) for k in keys}, str(tmp), metadata={"format": "pt"})
        written.append((tmp, out / name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, ks in zip(names, shards) for k in ks}}
        tmp = out / (INDEX_FILE + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append((tmp, out / INDEX_FILE))
    keep = {final.name for _, final in written}
    for p in out.iterdir():
        if p.name not in keep and (p.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.match(p.name)):
            p.unlink()
    for tmp, final in written:
        os.replace(tmp, final)
    return [final for _, final in written]


def save_hf_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write our state dict as an HF hub-layout checkpoint: config.json + safetensors (sharded with an index
    above max_shard_bytes) that transformers' `Qwen2VLForConditionalGeneration.from_pretrained` loads.

    `dtype` casts floating tensors (None keeps them). DTensors are gathered with full_tensor(). Raises
    CheckpointMismatchError if the state dict does not fit cfg. Returns the files written.
    """
    sd = {k: _to_plain_cpu(t, dtype) for k, t in state_dict.items()}
    check_state_dict(sd, cfg, what="state dict to save")
    hf_sd = to_hf_state_dict(sd, cfg.text.tie_word_embeddings)
    files = write_safetensors_shards(hf_sd, out_dir, max_shard_bytes)
    floating = {t.dtype for t in hf_sd.values() if t.is_floating_point()}
    hf_cfg = cfg.to_hf_dict()
    if len(floating) == 1 and (name := _DTYPE_NAMES.get(next(iter(floating)))):
        hf_cfg["torch_dtype"] = name  # 4.x reads torch_dtype, 5.x dtype
        hf_cfg["dtype"] = name
    cfg_path = Path(out_dir) / "config.json"
    tmp = cfg_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(hf_cfg, indent=2) + "\n")
    os.replace(tmp, cfg_path)
    return [*files, cfg_path]
