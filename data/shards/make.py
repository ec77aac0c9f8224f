"""Records + a media folder -> shards, sidecar indexes and the manifest (`python -m data.shards make`).

The input is a JSONL file or a JSON list, one record per sample, in our format (docs/data.md) or another tool's
(`--format`, data/shards/convert.py turns each record into our sample). Media items then reference files under
`--media` (embedded into the shard as members `img0.jpg`, `vid1.mp4`, ...), `data:` URIs (decoded and embedded)
or URLs (kept as references, read by the loader through data.storage).

A media path must resolve inside `--media` (after `..` and symlinks are resolved), so a dataset cannot pull
/etc/passwd into a shard; absolute paths are embedded only with `allow_absolute_media`. Records that cannot
become a sample are counted skips, reported with their line number; the manifest records the counts by reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import os
import re
import sys
from collections import Counter
from collections.abc import Iterable

from data.chatml import SkipSample, parse_sample
from data.media.image import image_size as header_size
from data.shards.convert import DEFAULT_FORMAT, get_converter, guess_format, read_records
from data.shards.webdataset import ShardWriter, index_shard_file, write_manifest
from model.processing import VisionProcessing


def _walk_media(obj: dict) -> Iterable[dict]:
    """Every image/video item dict of a sample (to embed or rewrite their references)."""
    contents = [m.get("content") for m in obj.get("messages") or [] if isinstance(m, dict)]
    contents.append(obj.get("content"))
    for c in contents:
        if isinstance(c, list):
            for it in c:
                if isinstance(it, dict) and any(k in it for k in ("image", "video")):
                    yield it


class MediaFiles:
    """Resolves a sample's media references under the media root and reads them (once per sample)."""

    def __init__(self, root: str, allow_absolute: bool = False) -> None:
        self.root = os.path.realpath(root)
        self.allow_absolute = allow_absolute
        self._cache: dict[str, tuple[bytes, str]] = {}

    def new_sample(self) -> None:
        self._cache.clear()

    def path(self, ref: str) -> str:
        """The real path of a local reference; SkipSample when it is outside the root (or missing)."""
        ref = ref.removeprefix("file://")  # a local path in URL form: the same rule
        if os.path.isabs(ref):
            if not self.allow_absolute:
                raise SkipSample("media_outside_root", f"media {ref!r} is an absolute path: only files inside --media "
                                                       f"{self.root} are embedded unless --allow-absolute-media is "
                                                       "given (for input you trust)")
            real = os.path.realpath(ref)
        else:
            real = os.path.realpath(os.path.join(self.root, ref))
            if os.path.commonpath([real, self.root]) != self.root:
                raise SkipSample("media_outside_root", f"media {ref!r} resolves to {real!r}, outside --media "
                                                       f"{self.root} ('..' or a symlink); copy the file into --media, "
                                                       "or reference it by absolute path with --allow-absolute-media")
        if not os.path.isfile(real):
            raise SkipSample("missing_media", f"media {ref!r} not found under {self.root}")
        return real

    def read(self, ref: str, kind: str) -> tuple[bytes, str]:
        """(bytes, extension) of a local path or a data: URI; the first read of a sample's file is kept."""
        if ref not in self._cache:
            if ref.startswith("data:"):
                self._cache[ref] = _data_uri(ref)
            else:
                path = self.path(ref)
                with open(path, "rb") as f:
                    self._cache[ref] = (f.read(), os.path.splitext(path)[1].lower())
        data, ext = self._cache[ref]
        return data, ext or (".jpg" if kind == "image" else ".mp4")

    def image_size(self, ref: str) -> tuple[int, int]:
        """(width, height) of an image reference (for converters that scale boxes by it)."""
        if "://" in ref and not ref.startswith("file://"):
            raise SkipSample("unsupported_media", f"pixel boxes on the URL image {ref!r}: its size is unknown here; "
                                                  "download it into --media")
        size = header_size(self.read(ref, "image")[0])
        if size is None:
            raise SkipSample("bad_image", f"image {ref!r} cannot be decoded")
        return size


def _data_uri(ref: str) -> tuple[bytes, str]:
    head, _, payload = ref.partition(",")
    if not head.endswith(";base64"):
        raise SkipSample("bad_media", f"data: URI {ref[:40]!r}... is not base64")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise SkipSample("bad_media", f"data: URI {ref[:40]!r}... is not valid base64") from None
    return data, mimetypes.guess_extension(head[5:].split(";")[0]) or ""


def embed_media(obj: dict, files: MediaFiles) -> dict[str, bytes]:
    """Members for a sample's local media; rewrites each reference to its member name (URLs stay as they are)."""
    members: dict[str, bytes] = {}
    names: dict[str, str] = {}  # reference -> member, so a file used twice is stored once
    for i, it in enumerate(_walk_media(obj)):
        t = "image" if "image" in it else "video"
        ref = it[t]
        if not isinstance(ref, str) or ("://" in ref and not ref.startswith(("data:", "file://"))):
            continue  # URLs stay references; the loader reads them through data.storage
        if ref not in names:
            data, ext = files.read(ref, t)
            names[ref] = f"{'img' if t == 'image' else 'vid'}{i}{ext}"
            members[names[ref]] = data
        it[t] = names[ref]
    return members


def _key(rec: object, lineno: int) -> str:
    key = None
    if isinstance(rec, dict):
        key = rec.pop("__key__", None) or rec.get("id") or rec.get("key")
    return re.sub(r"[^A-Za-z0-9_-]", "_", str(key or f"{lineno:09d}"))


def nothing_written(input_path: str, media_dir: str, fmt: str, skipped: dict[str, int]) -> str:
    """Why `make` wrote no sample, and the likely fix: the --format the first record's keys point to, or where
    relative media paths were looked up."""
    from data.pipeline import format_counts

    msg = f"wrote no sample from {input_path} (skipped: {format_counts(skipped)})"
    first = next((rec for _, rec in read_records(input_path) if not isinstance(rec, SkipSample)), None)
    guess = guess_format(first)
    if isinstance(first, dict) and guess is not None and guess[0] != fmt:
        return f"{msg}: the first record's keys are {sorted(first)}: {guess[1]}; add --format {guess[0]}"
    if skipped.get("missing_media") or skipped.get("media_outside_root"):
        return (f"{msg}: media paths in the records are relative to --media {os.path.abspath(media_dir)} (default: "
                "the working directory); give --media the folder they are relative to")
    keys = f"; the first record's keys are {sorted(first)}" if isinstance(first, dict) else ""
    return f"{msg}{keys}: see the skip reasons above (--format {fmt}; docs/data.md lists the formats)"


def make(input_path: str, media_dir: str, out_dir: str, samples_per_shard: int = 1000, tokenizer=None,
         prefix: str = "shard", fmt: str = DEFAULT_FORMAT, allow_absolute_media: bool = False,
         dataset_info: str | None = None, dataset: str | None = None,
         vision: VisionProcessing | None = None) -> dict:
    """Records + media folder -> shards, sidecar indexes and the manifest. Returns the manifest.

    `fmt`: the input's format (data/shards/convert.py FORMATS); `dataset_info` / `dataset`: a LLaMA-Factory
    dataset_info.json and entry giving the columns (formats sharegpt, llamafactory). The samples are the same for
    every model family (the loader renders them); `vision` (the family's processor facts, None: Qwen2-VL's) only
    sets the image token estimates of the sidecar indexes (smart_resize at its resize factor).
    """
    convert = get_converter(fmt, dataset_info, dataset, input_path)
    files = MediaFiles(media_dir, allow_absolute_media)
    os.makedirs(out_dir, exist_ok=True)
    skipped: Counter = Counter()
    indexes: list[dict] = []
    writer: ShardWriter | None = None
    used_keys: set[str] = set()

    def close_shard() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            indexes.append(index_shard_file(writer.path, tokenizer, vision))
            writer = None

    for lineno, rec in read_records(input_path):
        files.new_sample()
        key = _key(rec, lineno)
        try:
            if isinstance(rec, SkipSample):
                raise rec
            obj = convert(rec, files.image_size)
            parse_sample(obj)  # what the loader would skip, skipped here, with the line number
            members = embed_media(obj, files)
        except SkipSample as e:
            skipped[e.reason] += 1
            print(f"[make] line {lineno}: {e}; skipped", file=sys.stderr)
            continue
        base, n = key, 1
        while key in used_keys:
            key, n = f"{base}_{n}", n + 1
        used_keys.add(key)
        members["json"] = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        if writer is None:
            writer = ShardWriter(os.path.join(out_dir, f"{prefix}-{len(indexes):06d}.tar"))
        writer.write(key, members)
        if writer.count >= samples_per_shard:
            close_shard()
    close_shard()
    return write_manifest(out_dir, indexes, {"skipped": dict(skipped)})
