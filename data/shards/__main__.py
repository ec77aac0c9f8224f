"""python -m data.shards make|index|warm: build, index and pre-decode datasets.

    python -m data.shards make --input FILE.jsonl --media DIR --out DIR [--samples-per-shard N] [--tokenizer DIR]
    python -m data.shards index DIR [--tokenizer DIR]      # shards written by other tools (webdataset etc.)
    python -m data.shards warm --data DATASET... --cache-dir DIR [--workers N] [video options]

Each subcommand prints one summary line; bad input is reported per line / per sample and counted, never a
traceback (set QWEN2VL_DEBUG=1 to see one).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

from core.config import field_docs


def _parser() -> argparse.ArgumentParser:
    from data.media.video import VideoConfig

    ap = argparse.ArgumentParser(prog="python -m data.shards", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{make,index,warm}")
    mk = sub.add_parser("make", help="JSONL + media folder -> shards + sidecar indexes + dataset.json",
                        description="Convert a JSONL file (one sample per line, our format: docs/data.md) and the "
                                    "media it references into WebDataset shards with sidecar indexes.")
    mk.add_argument("--input", required=True, help="JSONL file, one sample per line")
    mk.add_argument("--media", default=".", help="folder that relative image/video paths resolve against "
                                                 "(default: the working directory)")
    mk.add_argument("--out", required=True, help="output directory (created if missing)")
    mk.add_argument("--samples-per-shard", type=int, default=1000, help="samples per .tar shard (default 1000)")
    mk.add_argument("--prefix", default="shard", help="shard file name prefix (default 'shard')")
    mk.add_argument("--tokenizer", default=None,
                    help="tokenizer directory: exact text token counts in the index (default: a bytes/4 estimate)")
    ix = sub.add_parser("index", help="write sidecar indexes + dataset.json for existing .tar shards",
                        description="(Re)index every .tar shard of a local directory and write its manifest.")
    ix.add_argument("dir", help="directory holding the .tar shards")
    ix.add_argument("--tokenizer", default=None, help="tokenizer directory: exact text token counts in the index")
    w = sub.add_parser("warm", help="decode a dataset's videos into the decode cache ahead of training",
                       description="Read the datasets as the loader does and decode every video into the cache "
                                   "under the key the loader looks up, so training never waits for these decodes.")
    w.add_argument("--data", nargs="+", required=True, help="dataset paths (local folders or s3:// / oss:// prefixes)")
    w.add_argument("--cache-dir", required=True, help="the cache directory (data.video.cache_dir of the recipe)")
    w.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="processes decoding in parallel, one shard each (default: half the cores)")
    docs, vdef = field_docs(VideoConfig), VideoConfig()
    for f in dataclasses.fields(VideoConfig):
        if f.name == "cache_dir":
            continue
        default = getattr(vdef, f.name)
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        help_text = " ".join(docs.get(f.name, "").split()).replace("%", "%%")
        w.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                       help=f"{help_text} (data.video.{f.name}; default {default})")
    w.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// paths (data.storage.endpoint_url)")
    w.add_argument("--oss-endpoint", default=None, help="OSS endpoint for oss:// paths (data.storage.oss_endpoint)")
    w.add_argument("--region", default=None, help="object-store region (data.storage.region)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    tok = None
    if getattr(args, "tokenizer", None):
        from data.tokenizer import Tokenizer

        tok = Tokenizer(args.tokenizer)
    if args.cmd == "make":
        from data.shards.make import make

        if args.samples_per_shard < 1:
            ap.error("--samples-per-shard must be >= 1")
        man = make(args.input, args.media, args.out, args.samples_per_shard, tok, args.prefix)
        print(f"wrote {man['samples']} samples in {len(man['shards'])} shards to {args.out}; "
              f"skipped: {man.get('skipped') or 'none'}")
    elif args.cmd == "index":
        from data.shards.webdataset import index_dir

        man = index_dir(args.dir, tok)
        print(f"indexed {man['samples']} samples in {len(man['shards'])} shards under {args.dir}")
    else:
        from data.media.video import VideoConfig
        from data.shards.warm import warm
        from data.storage import StorageConfig

        kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(VideoConfig) if f.name != "cache_dir"}
        vcfg = VideoConfig(cache_dir=args.cache_dir, **kw)
        scfg = StorageConfig(endpoint_url=args.endpoint_url, oss_endpoint=args.oss_endpoint, region=args.region)
        t0 = time.monotonic()
        r = warm(args.data, vcfg, scfg, args.workers)
        print(f"warm: {r['shards']} shards, {r['videos']} videos: {r['decoded']} decoded, {r['cached']} already "
              f"cached, {sum(r['failed'].values())} failed {r['failed']} in {time.monotonic() - t0:.1f}s "
              f"-> {args.cache_dir}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
