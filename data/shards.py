"""WebDataset shards with a sidecar index per shard, and the CLI that makes them.

    python -m data.shards make --input FILE.jsonl --media DIR --out DIR [--samples-per-shard N] [--tokenizer DIR]
    python -m data.shards index DIR [--tokenizer DIR]     # index shards written by other tools (webdataset etc.)

Layout of a dataset directory (or object-store prefix):

    dataset.json                         manifest: shard names, sample counts, byte sizes
    shard-000000.tar                     WebDataset tar: <key>.json, <key>.<name>.<ext> members, key by key
    shard-000000.tar.index.json          sidecar index of that shard

Sidecar index (JSON): {"version": 1, "shard": NAME, "bytes": SIZE, "samples": [{"key", "offset", "size",
"members": [[name, data_offset, data_size], ...], "media": {name: [width, height] | null}, "text_tokens",
"est_tokens"}, ...]}. `offset`/`size` span the sample's tar headers and data, so one ranged read fetches a sample
(random access for resume and shuffle-buffer restore), and consecutive samples are one contiguous range (chunked
sequential streaming); `data_offset` is relative to `offset`. `est_tokens` estimates the rendered length (exact
text tokens when --tokenizer is given, image tokens from the stored sizes at the default min/max pixels).

Members follow WebDataset's naming: the key is the member name up to the first dot of its basename, so keys
cannot contain dots (make replaces them).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import sys
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from data.image import IMAGE_EXTS, image_size
from data.vision import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, AspectRatioError, smart_resize

INDEX_SUFFIX = ".index.json"
MANIFEST = "dataset.json"
FORMAT = "qwen2vl-train-shards"
_KEY_RE = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")


def split_member(name: str) -> tuple[str, str] | None:
    """('dir/key', 'name.ext') of a tar member name by WebDataset's convention, or None (no extension)."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def join_url(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if root else name


# ---------------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Deterministic tar writer: the same samples give the same bytes (mtime 0, uid 0, sorted nothing)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - closed in close()
        self.count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """One sample: members by name after the key ('json', 'img0.jpg', ...); json first."""
        if "." in key.rsplit("/", 1)[-1] or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no '.' (WebDataset convention)")
        for name in sorted(members, key=lambda n: (n != "json", n)):
            data = members[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- indexing
def _text_of(obj: object) -> list[str]:
    """The text items of a sample JSON (for token estimates)."""
    out: list[str] = []

    def items(content: object) -> None:
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            for it in content:
                if isinstance(it, str):
                    out.append(it)
                elif isinstance(it, dict) and isinstance(it.get("text"), str):
                    out.append(it["text"])

    if isinstance(obj, dict):
        for m in obj.get("messages") or []:
            if isinstance(m, dict):
                out.append(str(m.get("role", "")))
                items(m.get("content"))
        items(obj.get("content"))
    return out


def _image_tokens(size: list[int] | None, min_pixels: int, max_pixels: int) -> int:
    if not size:
        return 0
    try:
        h, w = smart_resize(size[1], size[0], min_pixels=min_pixels, max_pixels=max_pixels)
    except (AspectRatioError, ValueError):
        return 0
    return (h // 28) * (w // 28)


def index_tar(fileobj, shard_name: str, nbytes: int, tokenizer=None) -> dict:
    """Sidecar index of one tar shard (see the module docstring)."""
    samples: list[dict] = []
    cur: dict | None = None
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            parts = split_member(info.name)
            if parts is None:
                continue
            key, name = parts
            end = info.offset_data + ((info.size + 511) // 512) * 512
            if cur is None or cur["key"] != key:
                cur = {"key": key, "offset": info.offset, "members": [], "media": {}, "_end": end}
                samples.append(cur)
            cur["members"].append([name, info.offset_data - cur["offset"], info.size])
            cur["_end"] = end
            lname = name.lower()
            if lname.endswith(IMAGE_EXTS) or lname == "json":
                fileobj_pos = fileobj.tell()
                data = tar.extractfile(info).read()  # type: ignore[union-attr]
                fileobj.seek(fileobj_pos)
                if lname == "json":
                    cur["_json"] = data
                else:
                    size = image_size(data)
                    cur["media"][name] = list(size) if size else None
    keys = Counter(s["key"] for s in samples)
    dup = [k for k, n in keys.items() if n > 1]
    if dup:
        raise ValueError(f"{shard_name}: members of samples {dup[:5]} are not contiguous (keys repeat)")
    for s in samples:
        s["size"] = s.pop("_end") - s["offset"]
        raw = s.pop("_json", None)
        text_tokens = None
        est = None
        if raw is not None:
            try:
                texts = _text_of(json.loads(raw))
                joined = "".join(texts)
                text_tokens = len(tokenizer.encode(joined)) if tokenizer is not None else None
                n_text = text_tokens if text_tokens is not None else len(joined.encode()) // 4
                n_img = sum(_image_tokens(v, DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS) for v in s["media"].values())
                est = n_text + n_img + 2 * len(s["media"]) + 4 * len(texts)
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
        s["text_tokens"] = text_tokens
        s["est_tokens"] = est
    return {"version": 1, "shard": shard_name, "bytes": nbytes, "samples": samples}


def index_shard_file(path: str, tokenizer=None) -> dict:
    """Index a local shard and write its sidecar (PATH.index.json); returns the index."""
    with open(path, "rb") as f:
        idx = index_tar(f, os.path.basename(path), os.path.getsize(path), tokenizer)
    _write_json(path + INDEX_SUFFIX, idx)
    return idx


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
    os.replace(tmp, path)  # atomic: a reader never sees half an index


def write_manifest(out_dir: str, indexes: list[dict], extra: dict | None = None) -> dict:
    shards = [{"name": i["shard"], "samples": len(i["samples"]), "bytes": i["bytes"]} for i in indexes]
    man = {"format": FORMAT, "version": 1, "shards": shards, "samples": sum(s["samples"] for s in shards)}
    man.update(extra or {})
    _write_json(os.path.join(out_dir, MANIFEST), man)
    return man


@dataclass
class ShardIndex:
    """A loaded sidecar index in array form (what the loader keeps per open shard)."""

    name: str
    keys: list[str]
    offsets: np.ndarray  # int64 (n,)
    sizes: np.ndarray  # int64 (n,)
    members: list[list[list]]  # per sample: [name, data_offset, data_size]

    @classmethod
    def from_json(cls, obj: dict) -> ShardIndex:
        if obj.get("version") != 1:
            raise ValueError(f"unsupported shard index version {obj.get('version')!r} for {obj.get('shard')!r}")
        s = obj["samples"]
        return cls(
            obj["shard"],
            [x["key"] for x in s],
            np.asarray([x["offset"] for x in s], dtype=np.int64),
            np.asarray([x["size"] for x in s], dtype=np.int64),
            [x["members"] for x in s],
        )

    def __len__(self) -> int:
        return len(self.keys)


def check_header(block: bytes, where: str) -> None:
    """The bytes at a sample's offset must start a tar header; else the index does not belong to the shard."""
    if len(block) < 512 or block[257:262] != b"ustar":
        raise ValueError(
            f"{where}: no tar header at the indexed offset: the sidecar index is out of date; rebuild it with "
            "`python -m data.shards index DIR`"
        )


def split_sample(buf: bytes | memoryview, members: list[list]) -> dict[str, bytes]:
    """Members of one sample from its bytes (as read from offset .. offset + size)."""
    return {name: bytes(buf[off : off + size]) for name, off, size in members}


# ---------------------------------------------------------------------------------------------- make
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


def index_dir(root: str, tokenizer=None) -> dict:
    """(Re)index every .tar of a local directory and write the manifest."""
    names = sorted(n for n in os.listdir(root) if n.endswith(".tar"))
    if not names:
        raise ValueError(f"no .tar shards in {root}")
    indexes = [index_shard_file(os.path.join(root, n), tokenizer) for n in names]
    return write_manifest(root, indexes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.shards", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make", help="JSONL + media folder -> shards + sidecar indexes + dataset.json")
    mk.add_argument("--input", required=True, help="JSONL file, one sample per line")
    mk.add_argument("--media", default=".", help="folder that relative image/video paths resolve against")
    mk.add_argument("--out", required=True, help="output directory")
    mk.add_argument("--samples-per-shard", type=int, default=1000)
    mk.add_argument("--prefix", default="shard", help="shard file name prefix")
    mk.add_argument("--tokenizer", default=None, help="tokenizer dir: exact text token counts in the index")
    ix = sub.add_parser("index", help="write sidecar indexes + dataset.json for existing .tar shards")
    ix.add_argument("dir")
    ix.add_argument("--tokenizer", default=None)
    args = ap.parse_args(argv)
    tok = None
    if args.tokenizer:
        from data.tokenizer import Tokenizer

        tok = Tokenizer(args.tokenizer)
    if args.cmd == "make":
        if args.samples_per_shard < 1:
            ap.error("--samples-per-shard must be >= 1")
        man = make(args.input, args.media, args.out, args.samples_per_shard, tok, args.prefix)
        print(f"wrote {man['samples']} samples in {len(man['shards'])} shards to {args.out}; "
              f"skipped: {man.get('skipped') or 'none'}")
    else:
        man = index_dir(args.dir, tok)
        print(f"indexed {man['samples']} samples in {len(man['shards'])} shards under {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
