"""python -m data.shards make|index|warm: build, index and pre-decode datasets.

    python -m data.shards make --input FILE --media DIR --out DIR [--format ours|llava|sharegpt|llamafactory|swift]
        [--dataset-info dataset_info.json [--dataset NAME]] [--allow-absolute-media] [--samples-per-shard N]
        [--prefix P] [--tokenizer DIR] [--family qwen2_vl|qwen2_5_vl|qwen3_vl]
    python -m data.shards index DIR [--tokenizer DIR] [--family F]  # shards written by other tools (webdataset etc.)
    python -m data.shards warm --recipe RECIPE.yaml [--data DATASET...] [--cache-dir DIR] [--workers N] [video options]
    python -m data.shards warm --data DATASET... --cache-dir DIR --family F [--workers N] [video options]

The samples a converter writes are the same for every model family (the loader renders them for the family of the
run: its chat template's system prompt, its vision blocks and video timestamps); `--family` decides what depends on
the family's resize factor: make's and index's token estimates in the sidecar indexes, and warm's cache keys and
frame sizes (warm with the run's recipe, or for the family you will train: else the loader decodes again).

Each subcommand prints one summary line; bad input is reported per line / per sample and counted. A mistake
(a missing file, a wrong directory, a truncated shard) is one line on stderr and exit code 2, no traceback (set
QWEN2VL_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

from core.cli import run_cli
from core.config import field_docs
from data.shards.convert import DEFAULT_FORMAT, FORMATS
from model.family import DEFAULT_FAMILY, FAMILY_NAMES


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (usage is one `--help` away)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from data.media.video import VideoConfig

    ap = _Parser(prog="python -m data.shards", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{make,index,warm}")
    mk = sub.add_parser("make", help="records + media folder -> shards + sidecar indexes + dataset.json",
                        description="Convert a JSONL file or JSON list (one sample per record: our format, or "
                                    "another tool's with --format; docs/data.md) and the media it references into "
                                    "WebDataset shards with sidecar indexes.")
    mk.add_argument("--input", required=True, help="JSONL file (one record per line) or JSON list of records")
    mk.add_argument("--format", choices=FORMATS, default=DEFAULT_FORMAT,
                    help="the records' format: ours (docs/data.md), llava (LLaVA conversations + image/video), "
                         "sharegpt or llamafactory (LLaMA-Factory's sharegpt/messages layouts with images/videos "
                         f"lists), swift (ms-swift messages, images, videos, objects) (default {DEFAULT_FORMAT})")
    mk.add_argument("--media", default=".", help="folder that relative image/video paths resolve against; media "
                                                 "must lie inside it (default: the working directory)")
    mk.add_argument("--allow-absolute-media", action="store_true",
                    help="also embed media given by absolute paths anywhere on this machine (only for input you "
                         "trust); relative paths must still stay inside --media")
    mk.add_argument("--dataset-info", default=None,
                    help="LLaMA-Factory dataset_info.json whose entry gives the columns and tags (with --format "
                         "sharegpt or llamafactory)")
    mk.add_argument("--dataset", default=None,
                    help="the entry of --dataset-info to use (default: the one whose file_name is the input's name)")
    mk.add_argument("--out", required=True, help="output directory (created if missing)")
    mk.add_argument("--samples-per-shard", type=int, default=1000, help="samples per .tar shard (default 1000)")
    mk.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    mk.add_argument("--tokenizer", default=None,
                    help="tokenizer directory: exact text token counts in the index (default: a bytes/4 estimate)")
    _family_arg(mk, "the model family whose resize factor the index's image token estimates use")
    ix = sub.add_parser("index", help="write sidecar indexes + dataset.json for existing .tar shards",
                        description="(Re)index every .tar shard of a local directory and write its manifest; a "
                                    "truncated shard is an error naming it.")
    ix.add_argument("dir", help="directory holding the .tar shards")
    ix.add_argument("--tokenizer", default=None, help="tokenizer directory: exact text token counts in the index")
    _family_arg(ix, "the model family whose resize factor the index's image token estimates use")
    w = sub.add_parser("warm", help="decode a dataset's videos into the decode cache ahead of training",
                       description="Read the datasets as the loader does and decode every video into the cache "
                                   "under the key the loader looks up, so training never waits for these decodes. "
                                   "The key depends on the video settings: take them from the training recipe "
                                   "(--recipe), or give the same values as options.")
    w.add_argument("--recipe", default=None,
                   help="the training recipe: its data.video settings (the run's own, so the keys match), "
                        "data.storage, data.video.cache_dir, and its training and eval datasets unless --data")
    w.add_argument("--data", nargs="+", default=None,
                   help="dataset paths (local folders or s3:// / oss:// prefixes); default: the recipe's")
    w.add_argument("--cache-dir", default=None,
                   help="the cache directory (default: the recipe's data.video.cache_dir)")
    w.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="processes decoding in parallel, one shard each (default: half the cores)")
    w.add_argument("--family", choices=FAMILY_NAMES, default=None,
                   help="the model family of the training run: its resize factor decides the frames' sizes and the "
                        "cache keys the loader looks up (default: the recipe's, else " + DEFAULT_FAMILY + ")")
    docs, vdef = field_docs(VideoConfig), VideoConfig()
    for f in dataclasses.fields(VideoConfig):
        if f.name == "cache_dir":
            continue
        default = getattr(vdef, f.name)
        if default is None:  # min_pixels / max_pixels: null = the family's default
            kind = int
        elif isinstance(default, bool):
            kind = lambda v: v.lower() in ("1", "true", "yes")  # noqa: E731
        else:
            kind = type(default)
        help_text = " ".join(docs.get(f.name, "").split()).replace("%", "%%")
        w.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                       help=f"{help_text} (data.video.{f.name}; default: the recipe's, else {default})")
    w.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// paths (data.storage.endpoint_url)")
    w.add_argument("--oss-endpoint", default=None, help="OSS endpoint for oss:// paths (data.storage.oss_endpoint)")
    w.add_argument("--region", default=None, help="object-store region (data.storage.region)")
    return ap


def _family_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--family", choices=FAMILY_NAMES, default=DEFAULT_FAMILY,
                   help=f"{what} (model.family of the recipe; default {DEFAULT_FAMILY})")


def _run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    if args.cmd == "make":
        if args.samples_per_shard < 1:
            ap.error("--samples-per-shard must be >= 1")
        if not os.path.isfile(args.input):
            raise ValueError(f"--input {args.input!r} is not a file: give the JSONL / JSON file of records")
        if not os.path.isdir(args.media):
            raise ValueError(f"--media {args.media!r} is not a directory: give the folder the media paths are in")
    elif args.cmd == "index" and not os.path.isdir(args.dir):
        raise ValueError(f"{args.dir!r} is not a directory: give the directory holding the .tar shards")
    from data.media.vision import family_vision

    family, family_from = args.family, "--family"
    if family is None:  # warm without --family: the recipe's
        from data.shards.warm import recipe_family

        family, family_from = recipe_family(args.recipe) if args.recipe else (DEFAULT_FAMILY, "the default family")
    vision = family_vision(family)
    tok = None
    if getattr(args, "tokenizer", None):
        from data.tokenizer import Tokenizer

        tok = Tokenizer(args.tokenizer)
    if args.cmd == "make":
        from data.shards.make import make, nothing_written

        man = make(args.input, args.media, args.out, args.samples_per_shard, tok, args.prefix, args.format,
                   args.allow_absolute_media, args.dataset_info, args.dataset, vision)
        if not man["samples"]:  # a dataset of nothing is a mistake to report, not a result (exit 2)
            raise ValueError(nothing_written(args.input, args.media, args.format, man.get("skipped") or {}))
        print(f"wrote {man['samples']} samples in {len(man['shards'])} shards to {args.out}; "
              f"skipped: {man.get('skipped') or 'none'}")
    elif args.cmd == "index":
        from data.shards.webdataset import index_dir

        man = index_dir(args.dir, tok, vision)
        print(f"indexed {man['samples']} samples in {len(man['shards'])} shards under {args.dir}")
    else:
        from data.shards.warm import warm

        paths, vcfg, scfg = _warm_settings(args)
        t0 = time.monotonic()
        r = warm(paths, vcfg, scfg, args.workers, vision)
        print(f"warm ({family}, {family_from}): {r['shards']} shards, {r['videos']} video references to "
              f"{r['distinct']} distinct videos: {r['decoded']} decoded now, {r['in_cache_before']} were in the "
              f"cache already, {sum(r['failed'].values())} failed {r['failed']} in {time.monotonic() - t0:.1f}s "
              f"-> {vcfg.cache_dir}")
    return 0


def _warm_settings(args: argparse.Namespace):
    """(datasets, video settings, storage settings) of a warm: the recipe's (--recipe), then the options given."""
    from data.media.video import VideoConfig
    from data.shards.warm import recipe_data
    from data.storage import StorageConfig

    paths, vcfg, scfg = list(args.data or []), VideoConfig(), StorageConfig()
    if args.recipe:
        data, specs = recipe_data(args.recipe)
        vcfg, scfg = data.resolved_video(), data.storage  # exactly what the run's loader decodes with
        paths = paths or specs
    if not paths:
        raise ValueError("warm: give the datasets (--data DATASET ...) or the training recipe (--recipe RECIPE.yaml)")
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(VideoConfig)
             if f.name != "cache_dir" and getattr(args, f.name) is not None}
    cache_dir = args.cache_dir or vcfg.cache_dir
    if not cache_dir:
        raise ValueError("warm: no cache directory: pass --cache-dir DIR (or set data.video.cache_dir in the recipe)")
    store = {k: v for k, v in (("endpoint_url", args.endpoint_url), ("oss_endpoint", args.oss_endpoint),
                               ("region", args.region)) if v is not None}
    return paths, dataclasses.replace(vcfg, cache_dir=cache_dir, **given), dataclasses.replace(scfg, **store)


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    # A user's mistake (ValueError / OSError: a wrong path, a truncated shard) is one line and exit code 2.
    return run_cli(f"python -m data.shards {args.cmd}", lambda _: _run(args, ap))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
