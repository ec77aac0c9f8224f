"""python -m tools.export CHECKPOINT OUT_DIR [--dtype bf16|fp16|fp32] [--max-shard-gb 5] [--lora merged|adapter]

Writes a Hugging Face directory of the checkpoint's model family (config.json + safetensors in the key layout of
the family's released checkpoints, sharded with an index above --max-shard-gb, plus the run's tokenizer files when
they are at hand and the family's preprocessor_config.json) from one of our sharded DCP checkpoints, saved under any
parallel layout. transformers' `<Family>ForConditionalGeneration.from_pretrained(OUT_DIR)` (e.g.
Qwen2_5_VLForConditionalGeneration) loads it and `python -m model.parity --hf OUT_DIR` checks it.

CHECKPOINT is a step_* directory, or a checkpoint dir / run dir (its latest complete step is taken).

A LoRA run's checkpoint (its config has a lora: section; model/lora.py) needs --lora: `merged` writes the same HF
directory with every adapter folded into its weight (W + scaling * B A), `adapter` writes peft's
adapter_config.json + adapter_model.safetensors (the groups trained in full as modules_to_save), which
`PeftModel.from_pretrained(<the HF base>, OUT_DIR)` loads (train/lora.py).

It runs in one process without a process group and streams: one decoder layer / ViT block at a time is read
from the checkpoint (DCP assembles the full tensors from every rank's shards) and appended to the current
safetensors shard, so exporting 72B needs about one shard of memory, not the model.

The weights are written in bf16 unless --dtype says otherwise (the checkpoint's fp32 master weights rounded: half
the bytes); the last line of the output names the dtype. --dtype fp32 keeps them as trained.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from core.cli import run_cli
from core.config import ConfigError, expand_env, from_dict
from core.dtypes import DTYPES
from model.config import ModelConfig
from model.family import get_family
from model.hf_adapter import HFShardWriter, expected_shapes, is_hf_dir, to_hf_state_dict, write_hf_config
from model.lora import LoRAConfig, apply_lora, is_adapter_key, merged_state_dict_from
from model.lora_peft import covering_modules, write_peft_dir
from model.resolve import checkpoint_config
from model.vlm import VLModel
from train.checkpoint import checkpoint_keys, read_meta, resolve_checkpoint
from train.lora import EXPORT_MODES

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
)


def _units(keys: list[str]) -> Iterator[list[str]]:
    """Our state-dict keys grouped so that q/k/v of one ViT block stay together (they fuse into `qkv`)."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        m = re.match(r"^(visual\.blocks\.\d+|layers\.\d+)\.", k)
        groups.setdefault(m.group(1) if m else "__top__", []).append(k)
    for _, ks in sorted(groups.items(), key=lambda kv: kv[0]):
        yield ks


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bf16", max_shard_gb: float = 5.0,
           lora: str | None = None) -> Path:
    """Export a checkpoint as an HF directory of its model family (or, with lora='adapter', a peft adapter); returns
    OUT_DIR."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    tdtype = DTYPES[dtype]
    ck = resolve_checkpoint(checkpoint)
    meta = read_meta(ck)
    mcfg = checkpoint_config(meta, ck)
    lcfg, shapes = _lora_shapes(ck, mcfg, lora)
    if lora == "adapter":
        return _export_adapter(ck, mcfg, lcfg, shapes, out_dir, tdtype)
    tie = mcfg.text.tie_word_embeddings
    keys = [k for k in shapes if not (tie and k == "lm_head.weight")]
    stored = checkpoint_keys(ck)
    absent = [k for k in keys if f"model.{k}" not in stored]
    if absent:
        raise ValueError(f"checkpoint {ck} lacks model tensors {absent[:5]} (of {len(absent)})")
    layout = get_family(mcfg.family).hf_write_layout
    writer = HFShardWriter(out_dir, int(max_shard_gb * 1e9))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        for unit in _units(keys):
            sd = {f"model.{k}": torch.empty(shapes[k], dtype=torch.float32) for k in unit}
            dcp.load(sd, storage_reader=FileSystemReader(str(ck)), no_dist=True)
            plain = {k: sd[f"model.{k}"] for k in unit}
            if lcfg is not None:  # --lora merged: fold this unit's adapters into its weights (fp32), then cast
                plain = merged_state_dict_from(plain, lcfg.scaling)
            for hk, t in to_hf_state_dict({k: v.to(tdtype) for k, v in plain.items()}, tie, layout).items():
                writer.add(hk, t)
    files = writer.close()
    out = Path(out_dir)
    write_hf_config(mcfg, out, tdtype)
    _copy_tokenizer(ck, out, mcfg)
    log.info("exported %s (step %s) to %s: %s weights, %d file(s), %.2f GB", ck, meta.get("step"), out, dtype,
             len(files), writer.total_bytes / 1e9)
    return out


def _lora_shapes(ck: Path, mcfg: ModelConfig, lora: str | None) -> tuple[LoRAConfig | None, dict]:
    """(the run's lora section or None, every model key's shape including the adapters'); one-line errors for a
    LoRA checkpoint without --lora and an adapter export of a run without adapters."""
    if lora not in (None, *EXPORT_MODES):
        raise ValueError(f"--lora {lora!r}: choose one of {', '.join(EXPORT_MODES)}")
    import yaml

    saved = (yaml.safe_load((ck / "config.yaml").read_text()) or {}) if (ck / "config.yaml").is_file() else {}
    lcfg = from_dict(LoRAConfig, saved["lora"], "lora") if saved.get("lora") else None
    has_adapters = any(k.startswith("model.") and is_adapter_key(k) for k in checkpoint_keys(ck))
    if has_adapters and lcfg is None:
        raise ValueError(f"checkpoint {ck} holds LoRA adapters but its config.yaml has no lora: section")
    if has_adapters and lora is None:
        raise ValueError(f"checkpoint {ck} is a LoRA run's: pass --lora merged (an HF directory with the adapters "
                         "folded into the weights) or --lora adapter (peft's adapter format)")
    if lora == "adapter" and not has_adapters:
        raise ValueError(f"--lora adapter: checkpoint {ck} has no LoRA adapters (its run had no lora: section); "
                         "export its full weights without --lora")
    if not has_adapters:
        return None, expected_shapes(mcfg)
    with torch.device("meta"):
        shape_model = VLModel(mcfg)
    apply_lora(shape_model, lcfg)
    return lcfg, {k: tuple(v.shape) for k, v in shape_model.state_dict().items()}


def _export_adapter(ck: Path, mcfg: ModelConfig, lcfg: LoRAConfig, shapes: dict, out_dir: str | Path,
                    tdtype: torch.dtype) -> Path:
    """--lora adapter: the adapters and the fully trained groups' tensors (small: read whole) in peft's format."""
    with torch.device("meta"):
        shape_model = VLModel(mcfg)
    apply_lora(shape_model, lcfg)
    keep = covering_modules(shape_model, lcfg.fully_trainable) if lcfg.fully_trainable else []
    keys = [k for k in shapes if is_adapter_key(k) or any(k.startswith(m + ".") for m in keep)]
    sd = {f"model.{k}": torch.empty(shapes[k], dtype=torch.float32) for k in keys}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(sd, storage_reader=FileSystemReader(str(ck)), no_dist=True)
    tensors = {k: sd[f"model.{k}"].to(tdtype) for k in keys}
    import yaml

    base = ((yaml.safe_load((ck / "config.yaml").read_text()) or {}).get("model") or {}).get("init_from")
    write_peft_dir({k: v for k, v in tensors.items() if is_adapter_key(k)}, mcfg, lcfg, out_dir,
                   {k: v for k, v in tensors.items() if not is_adapter_key(k)}, keep,
                   base_model=base if base and is_hf_dir(base) else None)
    log.info("exported the LoRA adapters of %s to %s (peft format)", ck, out_dir)
    return Path(out_dir)


PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def _copy_tokenizer(ck: Path, out: Path, mcfg: ModelConfig) -> None:
    """Copy the run's tokenizer files and write the family's preprocessor_config.json, so AutoProcessor works."""
    import yaml

    try:
        data = (yaml.safe_load((ck / "config.yaml").read_text()) or {}).get("data", {})
    except (OSError, yaml.YAMLError):
        return
    try:  # a path the saved config keeps as its ${VAR} reference: resolve it in this environment
        tok = Path(expand_env(data.get("tokenizer") or "", "data.tokenizer"))
    except ConfigError as e:
        log.warning("not copying the tokenizer: %s", e)
        tok = Path("")
    if tok.is_dir():
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copy2(tok / name, out / name)
    proc = get_family(mcfg.family).processing(mcfg)
    lo, hi = int(data.get("min_pixels") or proc.min_pixels), int(data.get("max_pixels") or proc.max_pixels)
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": PROCESSOR_CLASS[mcfg.family],
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": list(proc.pixel_mean),
        "image_std": list(proc.pixel_std),
        "min_pixels": lo, "max_pixels": hi, "size": {"shortest_edge": lo, "longest_edge": hi},
        "patch_size": proc.patch_size, "temporal_patch_size": proc.temporal_patch_size, "merge_size": proc.merge_size,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a step_* directory, or a checkpoint dir / run dir (latest step)")
    parser.add_argument("out_dir", help="output Hugging Face directory")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="weight dtype (default bf16: the checkpoint's fp32 weights rounded; fp32 keeps them)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    parser.add_argument("--lora", choices=EXPORT_MODES, default=None,
                        help="a LoRA run's checkpoint: 'merged' = HF directory with the adapters folded in, "
                             "'adapter' = peft adapter_config.json + adapter_model.safetensors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = export(args.checkpoint, args.out_dir, args.dtype, args.max_shard_gb, args.lora)
    print(f"{out} ({export_summary(out, args.dtype)})")
    return 0


def export_summary(out: Path, dtype: str) -> str:
    """'bf16 weights, 1 safetensors file, 0.02 GB' (the dtype said, since it is not the checkpoint's)."""
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files) / 1e9
    keep = "" if dtype == "fp32" else "; --dtype fp32 keeps the checkpoint's fp32 weights"
    return f"{dtype} weights{keep}, {len(files)} safetensors file(s), {size:.2f} GB"


if __name__ == "__main__":
    sys.exit(run_cli("python -m tools.export", main))
