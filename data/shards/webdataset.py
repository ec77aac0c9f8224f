"""The shard format: WebDataset tars with a sidecar index per shard, and a manifest (writing, indexing, reading).

Made by `python -m data.shards make` (data/shards/make.py) or indexed by `python -m data.shards index`.

Layout of a dataset directory (or object-store prefix):

    dataset.json                         manifest: shard names, sample counts, byte sizes
    shard-000000.tar                     WebDataset tar: <key>.json, <key>.<name>.<ext> members, key by key
    shard-000000.tar.index.json          sidecar index of that shard

Sidecar index (JSON): {"version": 1, "shard": NAME, "bytes": SIZE, "samples": [{"key", "offset", "size",
"members": [[name, data_offset, data_size], ...], "media": {name: [width, height] | null}, "text_tokens",
"est_tokens"}, ...]}. `offset`/`size` span the sample's tar headers and data, so one ranged read fetches a sample
(random access for resume and shuffle-buffer restore), and consecutive samples are one contiguous range (chunked
sequential streaming); `data_offset` is relative to `offset`. `est_tokens` estimates the rendered length (exact
text tokens when --tokenizer is given, image tokens from the stored sizes by smart_resize at the model family's
resize factor and default min/max pixels: `--family`, default Qwen2-VL).

Members follow WebDataset's naming: the key is the member name up to the first dot of its basename, so keys
cannot contain dots (make replaces them).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass

import numpy as np

from data.media.image import IMAGE_EXTS, image_size
from data.media.vision import AspectRatioError, smart_resize, vision_or_default
from model.processing import VisionProcessing

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


def _image_tokens(size: list[int] | None, vision: VisionProcessing) -> int:
    """Merged tokens of an image of `size` (width, height) at the family's factor and default pixel bounds."""
    if not size:
        return 0
    f = vision.factor
    try:
        h, w = smart_resize(size[1], size[0], f, vision.min_pixels, vision.max_pixels, clamp_to_factor=False)
    except (AspectRatioError, ValueError):
        return 0
    return (h // f) * (w // f)


class TruncatedShardError(ValueError):
    """A shard whose bytes end before its archive does (an interrupted copy or download)."""


def _truncated(shard_name: str, what: str) -> TruncatedShardError:
    return TruncatedShardError(
        f"{shard_name} is truncated or corrupt: {what}; its samples from there on would be lost. Re-create it "
        "(`python -m data.shards make`) or re-download it, then index again"
    )


def index_tar(fileobj, shard_name: str, nbytes: int, tokenizer=None, vision: VisionProcessing | None = None) -> dict:
    """Sidecar index of one tar shard (see the module docstring); `vision`: the model family's processor facts for
    the token estimate (None: Qwen2-VL's).

    Raises TruncatedShardError when the archive does not end with its end-of-archive marker (a zero block right
    after the last member) or a member's data runs past `nbytes`: Python's tarfile stops silently at a header
    position past the end of the file, so a shard cut on a 512-byte boundary would otherwise index as a
    shorter, valid-looking shard.
    """
    samples: list[dict] = []
    cur: dict | None = None
    n_members = 0
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:")  # noqa: SIM115 - closed below
    except tarfile.ReadError as e:
        raise ValueError(f"{shard_name} is not a tar archive ({e}); re-create it or re-download it") from None
    try:
        for info in tar:
            n_members += 1
            if info.offset_data + info.size > nbytes:
                raise _truncated(shard_name, f"member {info.name!r} needs bytes up to {info.offset_data + info.size}"
                                             f", the file has {nbytes}")
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
        archive_end = tar.offset  # where a header after the last member would start: the end marker
    except tarfile.ReadError as e:  # a member's data cut short ("unexpected end of data")
        raise _truncated(shard_name, f"{e} after member {n_members} (sample {len(samples)})") from None
    finally:
        tar.close()
    fileobj.seek(archive_end)
    marker = fileobj.read(512)
    if len(marker) < 512 or marker.count(0) != 512:
        found = "the file ends there" if len(marker) < 512 else "the bytes there are not a tar header"
        raise _truncated(shard_name, f"no end-of-archive marker after {len(samples)} samples at byte {archive_end} "
                                     f"({found}, file size {nbytes})")
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
                n_img = sum(_image_tokens(v, vision_or_default(vision)) for v in s["media"].values())
                est = n_text + n_img + 2 * len(s["media"]) + 4 * len(texts)
            except (UnicodeDecodeError, json.JSONDecodeError):
                pass
        s["text_tokens"] = text_tokens
        s["est_tokens"] = est
    return {"version": 1, "shard": shard_name, "bytes": nbytes, "samples": samples}


def index_shard_file(path: str, tokenizer=None, vision: VisionProcessing | None = None) -> dict:
    """Index a local shard and write its sidecar (PATH.index.json); returns the index."""
    with open(path, "rb") as f:
        idx = index_tar(f, os.path.basename(path), os.path.getsize(path), tokenizer, vision)
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


def index_dir(root: str, tokenizer=None, vision: VisionProcessing | None = None) -> dict:
    """(Re)index every .tar of a local directory and write the manifest (`vision`: the family, for token
    estimates)."""
    if not os.path.isdir(root):
        raise ValueError(f"{root!r} is not a directory: give the directory holding the .tar shards")
    names = sorted(n for n in os.listdir(root) if n.endswith(".tar"))
    if not names:
        raise ValueError(f"no .tar shards in {root}")
    indexes = [index_shard_file(os.path.join(root, n), tokenizer, vision) for n in names]
    return write_manifest(root, indexes)
