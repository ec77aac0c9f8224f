"""Stream a few microbatches and report what the loader does with the data.

    python -m data.inspect --data SPEC --tokenizer DIR --steps N [--family F] [--dump FILE] [--show K] [options]

SPEC: a dataset path (local dir, s3:// or oss:// prefix, or megatron .bin/.idx prefix), several joined with
commas, each optionally weighted as PATH@WEIGHT; or a YAML/JSON file holding a `data:` mapping (a recipe) or a
DataConfig mapping. Prints samples/s, tokens/s, packing efficiency and skip counts; --dump saves the microbatches
with torch.save as a list of dicts (input_ids, labels, position_ids (3, L), cu_seqlens, max_seqlen, pixel_values,
image_grid_thw, pixel_values_videos, video_grid_thw, sample_keys); --show K prints the first K samples of the
first microbatch as text, with the supervised tokens in [[...]]. Samples are rendered and resized for the model
family (--family; default: the recipe's model.family, else qwen2_vl): its chat template's system prompt, resize
factor, video timestamps and position ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from core.batch import IGNORE_INDEX
from core.cli import run_cli
from data.config import DataConfig, DatasetSpec
from data.loader import build_loader
from data.media.vision import family_vision
from data.tokenizer import Tokenizer
from model.family import DEFAULT_FAMILY, FAMILY_NAMES, get_family


def _config(args: argparse.Namespace) -> tuple[DataConfig, str]:
    """The data config and the model family (--family, else a recipe's model.family, else the default)."""
    spec = args.data
    family = None
    if os.path.isfile(spec) and spec.endswith((".yaml", ".yml", ".json")):
        with open(spec) as f:
            if spec.endswith(".json"):
                d = json.load(f)
            else:
                import yaml

                d = yaml.safe_load(f)
        model = d.get("model") if isinstance(d.get("model"), dict) else {}
        family = model.get("family")
        d = dict(d.get("data", d))
    else:
        datasets = []
        for part in spec.split(","):
            path, _, w = part.partition("@")
            datasets.append({"path": path, "weight": float(w) if w else 1.0})
        d = {"datasets": datasets}
    overrides = {"tokenizer": args.tokenizer, "max_tokens": args.max_tokens, "max_patches": args.max_patches,
                 "num_workers": args.workers, "seed": args.seed, "epochs": args.epochs,
                 "max_pixels": args.max_pixels}
    d.update({k: v for k, v in overrides.items() if v is not None})
    cfg = DataConfig.from_dict(d)
    if args.kind:
        cfg.datasets = [DatasetSpec(**{**vars(ds), "kind": args.kind}) for ds in cfg.datasets]
    return cfg, args.family or family or DEFAULT_FAMILY


def show(batch, tok: Tokenizer, k: int) -> None:
    """Print the first k samples: text with supervised tokens in [[...]] and vision pad runs collapsed."""
    sp = tok.special
    cu = batch.cu_seqlens.tolist()
    for s, e, key in list(zip(cu[:-1], cu[1:], batch.sample_keys))[:k]:
        ids = batch.input_ids[s:e].tolist()
        sup = [False] + [int(x) != IGNORE_INDEX for x in batch.labels[s : e - 1]]
        out, i = [], 0
        while i < len(ids):
            j = i
            if ids[i] in (sp.image_pad, sp.video_pad):
                while j < len(ids) and ids[j] == ids[i]:
                    j += 1
                out.append(f"<{'image' if ids[i] == sp.image_pad else 'video'}_pad x{j - i}>")
                i = j
                continue
            while j < len(ids) and sup[j] == sup[i] and ids[j] not in (sp.image_pad, sp.video_pad):
                j += 1
            text = tok.decode(ids[i:j])
            out.append(f"[[{text}]]" if sup[i] else text)
            i = j
        print(f"--- {key} ({e - s} tokens)\n{''.join(out)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="PATH[@WEIGHT][,PATH[@WEIGHT]...] or a YAML/JSON config file")
    ap.add_argument("--tokenizer", default=None, help="local Hugging Face tokenizer directory")
    ap.add_argument("--steps", type=int, default=10, help="microbatches to stream")
    ap.add_argument("--dump", default=None, help="torch.save the microbatches (list of dicts) to this file")
    ap.add_argument("--show", type=int, default=0, help="print the first K samples of the first microbatch")
    ap.add_argument("--max-tokens", type=int, default=None, help="data.max_tokens: tokens per microbatch")
    ap.add_argument("--max-patches", type=int, default=None, help="data.max_patches: ViT patch rows per microbatch")
    ap.add_argument("--max-pixels", type=int, default=None, help="data.max_pixels: largest resized image area")
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers: loader worker processes")
    ap.add_argument("--seed", type=int, default=None, help="data.seed: shard order, shuffle and mix")
    ap.add_argument("--epochs", type=int, default=None, help="data.epochs: passes over each dataset (default forever)")
    ap.add_argument("--kind", choices=["auto", "chat", "pretrain", "indexed"], default=None,
                    help="data.datasets[].kind of every dataset given with --data")
    ap.add_argument("--dp-rank", type=int, default=0, help="read as this data-parallel rank (default 0)")
    ap.add_argument("--dp-size", type=int, default=1, help="... of this many (default 1)")
    ap.add_argument("--family", choices=FAMILY_NAMES, default=None,
                    help="model family the samples are rendered and resized for (default: the recipe's "
                         f"model.family, else {DEFAULT_FAMILY})")
    args = ap.parse_args(argv)
    try:
        cfg, family = _config(args)
        vision = family_vision(family)
    except ValueError as e:
        ap.error(str(e))
    print(f"family {family} ({get_family(family).title}): resize factor {vision.factor}, default system prompt "
          f"{cfg.system_prompt(vision)!r}, video time as {vision.video_time}")
    loader = build_loader(cfg, args.dp_rank, args.dp_size, vision=vision)
    dumped = []
    t0 = time.perf_counter()
    first = None
    n = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t0
            if args.show:
                show(batch, Tokenizer.load(cfg.tokenizer), args.show)
        n += 1
        if args.dump:
            d = batch.as_dict()
            dumped.append({k: d[k] for k in ("input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen",
                                             "pixel_values", "image_grid_thw", "pixel_values_videos",
                                             "video_grid_thw", "sample_keys")})
        if n >= args.steps:
            break
    dt = time.perf_counter() - t0
    loader.close()
    m = loader.metrics()
    print(f"microbatches {n} in {dt:.2f}s (first after {first or 0:.2f}s, includes worker start)")
    print(f"samples/s {m['samples'] / dt:.1f}  tokens/s {m['tokens'] / dt:.0f}  "
          f"(samples {m['samples']}, tokens {m['tokens']}, supervised {m['supervised_tokens']}, "
          f"images {m['images']}, videos {m['videos']})")
    print(f"packing efficiency {m['packing_efficiency']:.4f} of max_tokens {cfg.max_tokens}; "
          f"patch utilization {m['patch_utilization']:.4f} of max_patches {cfg.patch_budget}")
    skips = {k: v for k, v in m.items() if k.startswith("skipped/")}
    print(f"skipped {m['skipped']}: {json.dumps(skips) if skips else 'none'}; truncated {m['truncated']}; "
          f"boxes clamped to their image {m['clamped_boxes']}")
    if args.dump:
        torch.save(dumped, args.dump)
        print(f"dumped {len(dumped)} microbatches to {args.dump}")
    return 0


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_cli("python -m data.inspect", main))
