"""python -m tools.export CHECKPOINT OUT_DIR [--dtype bf16|fp16|fp32] [--max-shard-gb 5]

Writes a Hugging Face Qwen2-VL directory (config.json + safetensors in the hub key layout, sharded with an
index above --max-shard-gb, plus the run's tokenizer files when they are at hand) from one of our sharded
DCP checkpoints, saved under any parallel layout. transformers' `Qwen2VLForConditionalGeneration
.from_pretrained(OUT_DIR)` loads it and `python -m model.parity --hf OUT_DIR` checks it.

CHECKPOINT is a step_* directory, or a checkpoint dir / run dir (its latest complete step is taken).

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
from core.config import ConfigError, expand_env
from core.dtypes import DTYPES
from model.hf_adapter import HFShardWriter, expected_shapes, to_hf_state_dict, write_hf_config
from model.resolve import checkpoint_config
from model.vision import PIXEL_MEAN, PIXEL_STD
from train.checkpoint import checkpoint_keys, read_meta, resolve_checkpoint

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


def export(checkpoint: str | Path, out_dir: str | Path, dtype: str = "bf16", max_shard_gb: float = 5.0) -> Path:
    """Export a checkpoint as an HF Qwen2-VL directory; returns OUT_DIR."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    tdtype = DTYPES[dtype]
    ck = resolve_checkpoint(checkpoint)
    meta = read_meta(ck)
    mcfg = checkpoint_config(meta, ck)
    shapes = expected_shapes(mcfg)
    tie = mcfg.text.tie_word_embeddings
    keys = [k for k in shapes if not (tie and k == "lm_head.weight")]
    stored = checkpoint_keys(ck)
    absent = [k for k in keys if f"model.{k}" not in stored]
    if absent:
        raise ValueError(f"checkpoint {ck} lacks model tensors {absent[:5]} (of {len(absent)})")
    writer = HFShardWriter(out_dir, int(max_shard_gb * 1e9))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        for unit in _units(keys):
            sd = {f"model.{k}": torch.empty(shapes[k], dtype=torch.float32) for k in unit}
            dcp.load(sd, storage_reader=FileSystemReader(str(ck)), no_dist=True)
            for hk, t in to_hf_state_dict({k: sd[f"model.{k}"].to(tdtype) for k in unit}, tie).items():
                writer.add(hk, t)
    files = writer.close()
    out = Path(out_dir)
    write_hf_config(mcfg, out, tdtype)
    _copy_tokenizer(ck, out)
    log.info("exported %s (step %s) to %s: %s weights, %d file(s), %.2f GB", ck, meta.get("step"), out, dtype,
             len(files), writer.total_bytes / 1e9)
    return out


def _copy_tokenizer(ck: Path, out: Path) -> None:
    """Copy the run's tokenizer files and write Qwen2-VL's preprocessor_config.json, so AutoProcessor works."""
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
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": 1 / 255,
        "image_mean": list(PIXEL_MEAN),
        "image_std": list(PIXEL_STD),
        "min_pixels": int(data.get("min_pixels", 3136)),
        "max_pixels": int(data.get("max_pixels", 12845056)),
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="a step_* directory, or a checkpoint dir / run dir (latest step)")
    parser.add_argument("out_dir", help="output Hugging Face directory")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="weight dtype (default bf16: the checkpoint's fp32 weights rounded; fp32 keeps them)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = export(args.checkpoint, args.out_dir, args.dtype, args.max_shard_gb)
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
