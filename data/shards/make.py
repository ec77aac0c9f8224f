"""JSONL + a media folder -> shards, sidecar indexes and the manifest (`python -m data.shards make`).

Each line of the JSONL is one sample in our format (docs/data.md): media items reference files under `--media`
(embedded into the shard as members) or URLs (kept as references, read by the loader through data.storage).
Lines that cannot become a sample are counted skips, reported with their line number; the manifest records the
counts by reason.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable

from data.shards.webdataset import ShardWriter, index_shard_file, write_manifest


def _walk_media(obj: dict) -> Iterable[dict]:
    """Every image/video item dict of a sample (to embed or rewrite their references)."""
    contents = [m.get("content") for m in obj.get("messages") or [] if isinstance(m, dict)]
    contents.append(obj.get("content"))
    for c in contents:
        if isinstance(c, list):
            for it in c:
                if isinstance(it, dict) and any(k in it for k in ("image", "video")):
                    yield it


def make(input_path: str, media_dir: str, out_dir: str, samples_per_shard: int = 1000, tokenizer=None,
         prefix: str = "shard") -> dict:
    """JSONL + media folder -> shards, sidecar indexes and the manifest. Returns the manifest."""
    os.makedirs(out_dir, exist_ok=True)
    skipped: Counter = Counter()
    indexes: list[dict] = []
    writer: ShardWriter | None = None
    used_keys: set[str] = set()

    def close_shard() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            indexes.append(index_shard_file(writer.path, tokenizer))
            writer = None

    with open(input_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                skipped["malformed_json"] += 1
                print(f"[make] line {lineno}: malformed JSON ({e}); skipped", file=sys.stderr)
                continue
            if not isinstance(obj, dict) or not ("messages" in obj or "content" in obj):
                skipped["bad_format"] += 1
                print(f"[make] line {lineno}: neither 'messages' nor 'content'; skipped", file=sys.stderr)
                continue
            key = str(obj.pop("__key__", None) or obj.get("id") or obj.get("key") or f"{lineno:09d}")
            key = re.sub(r"[^A-Za-z0-9_-]", "_", key)
            base, n = key, 1
            while key in used_keys:
                key, n = f"{base}_{n}", n + 1
            used_keys.add(key)
            members: dict[str, bytes] = {}
            missing = None
            for i, it in enumerate(_walk_media(obj)):
                t = "image" if "image" in it else "video"
                ref = it[t]
                if not isinstance(ref, str) or "://" in ref:
                    continue  # URLs stay references; the loader reads them through data.storage
                path = ref if os.path.isabs(ref) else os.path.join(media_dir, ref)
                if not os.path.isfile(path):
                    missing = ref
                    break
                ext = os.path.splitext(path)[1].lower() or (".jpg" if t == "image" else ".mp4")
                name = f"{'img' if t == 'image' else 'vid'}{i}{ext}"
                with open(path, "rb") as mf:
                    members[name] = mf.read()
                it[t] = name
            if missing is not None:
                skipped["missing_media"] += 1
                print(f"[make] line {lineno} (key {key}): media {missing!r} not found under {media_dir}; skipped",
                      file=sys.stderr)
                continue
            members["json"] = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
            if writer is None:
                writer = ShardWriter(os.path.join(out_dir, f"{prefix}-{len(indexes):06d}.tar"))
            writer.write(key, members)
            if writer.count >= samples_per_shard:
                close_shard()
    close_shard()
    man = write_manifest(out_dir, indexes, {"skipped": dict(skipped)})
    return man
