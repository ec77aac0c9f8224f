"""The one Hugging Face layer: checkpoints of every family <-> our modules (keys, config, safetensors files, slices).

Everything that reads or writes HF weights comes through here: `load_hf_model` (a whole model), `load_hf_slices`
(this rank's shards of a sharded model, reading only its slices: `model.init_from` of a 72B run never holds the
full model in any process), `save_hf_model` / `save_hf_checkpoint` (a whole state dict) and `HFShardWriter`
(streaming, one tensor group at a time: `python -m tools.export`).

Key layouts read (every family names its tensors the same way under these prefixes):
- hub layout (what the released Qwen2-VL and Qwen2.5-VL checkpoints hold): `visual.*`, `model.*` (decoder),
  `lm_head.*`;
- transformers >= 4.52 / 5.x in-memory layout (what `model.state_dict()` returns there, what the released
  Qwen3-VL checkpoints and some re-saved ones hold): `model.visual.*`, `model.language_model.*`, `lm_head.*`.
Written: the layout of the family's released checkpoints (ModelFamily.hf_write_layout), which transformers
`from_pretrained` loads.

Ours differs only where tensor parallelism wants it: the ViT attention's fused `qkv` is split into q/k/v
projections (rows [q; k; v]) and `attn.proj` is called `attn.o_proj`; decoder keys lose the `model.` prefix.
`hf_source()` is that mapping, one key at a time (with the row offset into a fused qkv); every reader uses it.

Tied embeddings (2B): the hub checkpoint has no `lm_head.weight` (or a copy equal to the embedding); our
state dict carries `lm_head.weight` as the SAME tensor as `embed_tokens.weight`, because that is what
`VLModel.state_dict()` returns for a tied model and what `load_state_dict(strict=True)` expects.

NOTE: DCP's HuggingFaceStorageReader/Writer were considered: they map keys one to one, and our q/k/v (sharded
column-wise under TP) are row blocks of HF's fused qkv, which is no DCP chunk of one tensor; the safetensors
slice reads below express it directly.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from core.config import ConfigError
from core.dtypes import HF_DTYPE_NAMES
from model.config import ModelConfig
from model.family import config_from_hf_dict, get_family, hf_config_dict
from model.vlm import VLModel

log = logging.getLogger(__name__)

_VIS_QKV = re.compile(r"^visual\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_VIS_PROJ = re.compile(r"^visual\.blocks\.(\d+)\.attn\.proj\.(weight|bias)$")
_OUR_VIS_ATTN = re.compile(r"^visual\.blocks\.(\d+)\.attn\.(q_proj|k_proj|v_proj|o_proj)\.(weight|bias)$")

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors(\.tmp)?$")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # the hub's usual 5 GB shards


class CheckpointMismatchError(ConfigError):
    """The checkpoint's tensors do not fit the config: missing, unexpected or mis-shaped keys."""


# ------------------------------------------------------------------------------------------ key mapping
def normalize_hf_key(key: str) -> str:
    """Map any supported HF layout to the hub layout."""
    if key.startswith("model.visual."):
        return key[len("model.") :]
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def to_layout(hub_key: str, layout: str) -> str:
    """A hub-layout key in the layout a family writes ('hub' or 'transformers5')."""
    if layout == "hub":
        return hub_key
    if hub_key.startswith("visual."):
        return "model." + hub_key
    if hub_key.startswith("model."):
        return "model.language_model." + hub_key[len("model.") :]
    return hub_key


def hf_source(fqn: str, cfg: ModelConfig) -> tuple[str, int, bool]:
    """Where our tensor `fqn` lives in a hub-layout checkpoint: (hub key, first row in it, fused qkv?)."""
    parts = fqn.split(".")
    if fqn.startswith("visual.blocks.") and parts[3] == "attn":
        proj, kind = parts[4], parts[5]
        if proj in ("q_proj", "k_proj", "v_proj"):
            row = ("q_proj", "k_proj", "v_proj").index(proj) * cfg.vision.embed_dim
            return f"visual.blocks.{parts[2]}.attn.qkv.{kind}", row, True
        if proj == "o_proj":
            return f"visual.blocks.{parts[2]}.attn.proj.{kind}", 0, False
    if fqn.startswith("visual."):
        return fqn, 0, False
    if fqn == "lm_head.weight":
        return ("model.embed_tokens.weight" if cfg.text.tie_word_embeddings else "lm_head.weight"), 0, False
    return "model." + fqn, 0, False


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
                f"unexpected key {key!r} in the checkpoint (known prefixes: visual., model., lm_head.)"
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


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], tie_word_embeddings: bool,
                     layout: str = "hub") -> dict[str, torch.Tensor]:
    """Ours -> HF (q/k/v fused back into `qkv`; no `lm_head.weight` when tied), in `layout` ('hub' or
    'transformers5'). A subset of our keys converts on its own as long as the q/k/v of a ViT block come together."""
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
    return {to_layout(k, layout): t for k, t in out.items()}


# ------------------------------------------------------------------------------------------ config
def read_hf_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of an HF directory (or of its config.json), of whichever supported family its model_type
    names; a ValueError naming the file, the key and the supported families otherwise."""
    p = Path(path)
    f = p if p.suffix == ".json" else p / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: an HF checkpoint directory needs config.json")
    try:
        d = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON: {e}") from e
    return config_from_hf_dict(d, source=str(f))


def write_hf_config(cfg: ModelConfig, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """config.json (atomically) for `cfg`, naming the weights' dtype when they have one."""
    hf_cfg = hf_config_dict(cfg)
    if dtype is not None and (name := HF_DTYPE_NAMES.get(dtype)):
        hf_cfg["torch_dtype"] = name  # 4.x reads torch_dtype, 5.x dtype
        hf_cfg["dtype"] = name
    path = Path(out_dir) / "config.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(hf_cfg, indent=2) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def is_hf_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and (
        (p / SINGLE_FILE).is_file() or (p / INDEX_FILE).is_file() or any(p.glob("*.safetensors"))
    )


# ------------------------------------------------------------------------------------------ validation
def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our state-dict keys and shapes for `cfg` (built on the meta device: no memory, any size)."""
    with torch.device("meta"):
        model = VLModel(cfg)
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
    lines = [f"{what} does not match the {get_family(cfg.family).title} config:"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            shown = items[:20]
            more = f" ... and {len(items) - len(shown)} more" if len(items) > len(shown) else ""
            lines.append(f"  {title} ({len(items)}): " + "; ".join(shown) + more)
    lines.append("  (check that config.json belongs to these weights: layer counts, widths, vocab size)")
    raise CheckpointMismatchError("\n".join(lines))


# ------------------------------------------------------------------------------------------ reading
class HFReader:
    """The safetensors files of an HF directory (single file, or sharded with an index): which file holds each
    key (either layout, addressed in the hub layout), whole tensors and row/column slices of them."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import safe_open

        d = Path(path)
        if not d.is_dir():
            raise FileNotFoundError(f"HF checkpoint directory {d} does not exist")
        self.dir = d
        index = d / INDEX_FILE
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if not (d / shard).exists():
                    raise FileNotFoundError(f"{index} lists shard {shard}, which is not in {d}")
        else:
            files = [d / SINGLE_FILE] if (d / SINGLE_FILE).is_file() else sorted(d.glob("*.safetensors"))
            if len(files) != 1:
                if any(d.glob("*.bin")):
                    raise FileNotFoundError(
                        f"{d} holds PyTorch .bin weights only; convert them to safetensors (transformers: "
                        "model.save_pretrained(dir, safe_serialization=True)) and retry"
                    )
                raise FileNotFoundError(f"no {SINGLE_FILE}, {INDEX_FILE} or single *.safetensors file in {d}")
            with safe_open(str(files[0]), framework="pt") as f:
                weight_map = {k: files[0].name for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        self.weight_map = weight_map
        # Either key layout on disk -> the hub layout we address.
        self.hub = {normalize_hf_key(k): (k, fname) for k, fname in weight_map.items()}

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, under the names stored on disk."""
        from safetensors.torch import load_file

        tensors: dict[str, torch.Tensor] = {}
        for fname in sorted(set(self.weight_map.values())):
            part = load_file(str(self.dir / fname), device="cpu")
            listed = {k for k, v in self.weight_map.items() if v == fname}
            if absent := sorted(listed - part.keys()):
                raise CheckpointMismatchError(f"{self.dir / INDEX_FILE} maps {absent[:5]} to {fname}, which does "
                                              "not hold them")
            if extra := sorted(part.keys() - listed):
                log.warning("%s holds %d tensors the index does not list (e.g. %s); reading them anyway",
                            fname, len(extra), extra[0])
            tensors.update(part)
        return tensors


def read_hf_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (single `model.safetensors` or sharded with an index)."""
    return HFReader(path).read_all()


def load_hf_checkpoint(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF directory of any family (config.json + safetensors, either key layout) into our layout.

    Returns (config, state_dict) with state_dict ready for `VLModel(config).load_state_dict(sd, strict=True)`.
    `dtype` casts floating tensors (None keeps the stored dtype). Raises CheckpointMismatchError naming every
    missing, unexpected or mis-shaped key.
    """
    d = Path(path)
    cfg = read_hf_config(d)
    hf_sd = read_hf_tensors(d)
    if dtype is not None:
        hf_sd = {k: t.to(dtype) if t.is_floating_point() else t for k, t in hf_sd.items()}
    sd, src = _from_hf(hf_sd, cfg.text.tie_word_embeddings)
    check_state_dict(sd, cfg, src, what=f"checkpoint {d}")
    return cfg, sd


def load_hf_model(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    attn_backend: str | None = None,
) -> VLModel:
    """Build the model from an HF directory of any family (config.json + safetensors, either key layout).

    The model is built on the meta device and takes the loaded tensors as its parameters (no random init, no
    second copy). `dtype` casts floating weights (None keeps the checkpoint's dtype).
    """
    cfg, sd = load_hf_checkpoint(path, dtype=dtype)
    if attn_backend is not None:
        cfg = cfg.replace(attn_backend=attn_backend)
    with torch.device("meta"):
        model = VLModel(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.text.tie_word_embeddings:
        # assign=True gave both modules their own Parameter object; tie them again.
        model.lm_head.weight = model.embed_tokens.weight
    model.init_buffers("cpu")
    return model.to(device)


def _local_view(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(local tensor, its slice of the global tensor) for a plain tensor or a DTensor shard."""
    if hasattr(t, "to_local") and hasattr(t, "device_mesh"):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), tuple(slice(o, o + n) for o, n in zip(offset, shape))
    return t, tuple(slice(0, n) for n in t.shape)


@torch.no_grad()
def load_hf_slices(named_tensors: Mapping[str, torch.Tensor], hf_dir: str | os.PathLike, cfg: ModelConfig) -> int:
    """Copy an HF checkpoint into this rank's tensors (plain, or DTensor shards of any TP/FSDP layout),
    reading only the local slice of each (safe_open + get_slice). Returns the number of tensors filled; raises
    CheckpointMismatchError naming missing keys and shape mismatches."""
    from safetensors import safe_open

    reader = HFReader(hf_dir)
    by_file: dict[str, list[tuple[str, torch.Tensor, str, int, bool]]] = {}
    missing = []
    for fqn, t in named_tensors.items():
        key, row, fused = hf_source(fqn, cfg)
        if key not in reader.hub:
            missing.append(f"{fqn} (needs {key})")
            continue
        orig, fname = reader.hub[key]
        by_file.setdefault(fname, []).append((fqn, t, orig, row, fused))
    if missing:
        raise CheckpointMismatchError(f"HF checkpoint {reader.dir} lacks {len(missing)} tensors: "
                                      f"{', '.join(missing[:8])}")
    n = 0
    for fname, items in by_file.items():
        with safe_open(str(reader.dir / fname), framework="pt") as f:
            for fqn, t, orig, row, fused in items:
                local, sl = _local_view(t)
                src = f.get_slice(orig)
                gshape = tuple(src.get_shape())
                want = tuple(t.shape)
                exp = (want[0] * 3, *want[1:]) if fused else want
                if gshape != exp:
                    raise CheckpointMismatchError(f"{reader.dir}: {orig} has shape {gshape}, but {fqn} needs {exp}")
                rows = slice(sl[0].start + row, sl[0].stop + row) if sl else None
                part = src[(rows, *sl[1:])] if sl else src[:]
                local.copy_(part.to(local.dtype))
                n += 1
    log.info("loaded %d tensors from HF checkpoint %s", n, reader.dir)
    return n


# ------------------------------------------------------------------------------------------ writing
def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """safetensors refuses tensors that share storage: copy views (e.g. q/k/v rows of one qkv) out."""
    t = t.contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


class HFShardWriter:
    """Streams tensors into `model.safetensors`, or `model-0000i-of-0000n.safetensors` + the index once they
    pass max_shard_bytes. Files are written under temporary names and renamed by `close()`, after stale shards
    of an earlier save in the directory are removed, so a reader never sees two saves mixed. Files are
    world-readable (0644), like `save_pretrained`'s."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        for p in self.out.iterdir():  # leftovers of an interrupted save
            if p.name.endswith(".tmp") and (p.name.startswith("shard-") or _SHARD_RE.match(p.name)):
                p.unlink()
        self.max_bytes = max_shard_bytes
        self._cur: dict[str, torch.Tensor] = {}
        self._cur_bytes = 0
        self._tmp: list[Path] = []
        self._keys: list[list[str]] = []
        self.total_bytes = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        n = t.numel() * t.element_size()
        if self._cur and self._cur_bytes + n > self.max_bytes:
            self._flush()
        self._cur[key] = _own_storage(t.detach().cpu())
        self._cur_bytes += n
        self.total_bytes += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._cur:
            return
        path = self.out / f"shard-{len(self._tmp):05d}.safetensors.tmp"
        save_file(self._cur, str(path), metadata={"format": "pt"})
        self._tmp.append(path)
        self._keys.append(sorted(self._cur))
        self._cur, self._cur_bytes = {}, 0

    def close(self) -> list[Path]:
        """Publish the files; returns them (shards, then the index when sharded)."""
        self._flush()
        n = len(self._tmp)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        keep = set(names) | ({INDEX_FILE} if n > 1 else set())
        for p in self.out.iterdir():
            if p.name not in keep and (p.name in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.match(p.name)):
                p.unlink()
        final = []
        for tmp, name in zip(self._tmp, names):
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.out / name)
            final.append(self.out / name)
        if n > 1:
            weight_map = {k: name for name, keys in zip(names, self._keys) for k in keys}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            tmp = self.out / (INDEX_FILE + ".tmp")
            tmp.write_text(json.dumps(index, indent=2) + "\n")
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.out / INDEX_FILE)
            final.append(self.out / INDEX_FILE)
        return final


def write_safetensors_shards(
    tensors: Mapping[str, torch.Tensor], out_dir: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[Path]:
    """Write tensors (any key layout) with an HFShardWriter, in sorted key order."""
    w = HFShardWriter(out_dir, max_shard_bytes)
    for k in sorted(tensors):
        w.add(k, tensors[k])
    return w.close()


def _to_plain_cpu(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if hasattr(t, "full_tensor"):  # DTensor (TP/FSDP): gather the full tensor first
        t = t.full_tensor()
    t = t.detach().to("cpu")
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous()


def save_hf_checkpoint(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: torch.dtype | None = None,
) -> list[Path]:
    """Write our state dict as an HF checkpoint in the family's layout: config.json + safetensors (sharded with an
    index above max_shard_bytes) that transformers' `<Family>ForConditionalGeneration.from_pretrained` loads.

    `dtype` casts floating tensors (None keeps them). DTensors are gathered with full_tensor(). Raises
    CheckpointMismatchError if the state dict does not fit cfg. Returns the files written.
    """
    sd = {k: _to_plain_cpu(t, dtype) for k, t in state_dict.items()}
    check_state_dict(sd, cfg, what="state dict to save")
    hf_sd = to_hf_state_dict(sd, cfg.text.tie_word_embeddings, get_family(cfg.family).hf_write_layout)
    files = write_safetensors_shards(hf_sd, out_dir, max_shard_bytes)
    floating = {t.dtype for t in hf_sd.values() if t.is_floating_point()}
    return [*files, write_hf_config(cfg, out_dir, next(iter(floating)) if len(floating) == 1 else None)]


def save_hf_model(
    model: VLModel, out_dir: str | os.PathLike, *, max_shard_bytes: int | None = None, dtype: torch.dtype | None = None
) -> list[Path]:
    """Write a whole (unsplit) model as an HF hub-layout checkpoint (see save_hf_checkpoint)."""
    return save_hf_checkpoint(model.state_dict(), model.cfg, out_dir,
                              max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES, dtype=dtype)
