"""Datasets as sequences of samples with random access: planning (main process), epoch order, reading (workers).

A dataset is a list of shards (WebDataset tars with sidecar indexes, or blocks of a megatron indexed dataset).
Epoch e of dataset d visits its shards in a seeded permutation; the concatenated sample sequence is cut into
`dp_size * num_workers` contiguous slices, one per global worker, so each worker streams a few shards
sequentially (object-store friendly) and every sample of the epoch is read by exactly one worker. A position in
that sequence, (epoch, pos), is the sample reference the loader state stores: it maps back to (shard, index)
and, through the sidecar index, to a byte range - random access for resume.

Unreadable shards (a truncated tar, a missing or stale sidecar index) raise BadShard from the Reader; the worker
pipeline skips the samples it cannot read and counts them (data/pipeline.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from data.config import DatasetSpec
from data.indexed import IndexedText
from data.sample import RawSample
from data.shards.webdataset import INDEX_SUFFIX, MANIFEST, ShardIndex, check_header, join_url, split_sample
from data.storage import StorageConfig, get_storage
from data.storage.errors import ObjectNotFoundError, StorageAccessDenied, StorageError

log = logging.getLogger("data.loader")

INDEXED_BLOCK = 1024  # sequences per virtual shard of an indexed dataset (the unit of the epoch permutation)
_M64 = (1 << 64) - 1


def mix64(*xs: int) -> int:
    """A 64-bit hash of integers (splitmix64 chained): the loader's only source of randomness.

    Counter-based, so a random decision is a pure function of (seed, stream, counter) and the loader state need
    not carry any RNG state.
    """
    h = 0x9E3779B97F4A7C15
    for x in xs:
        z = (h ^ (x & _M64)) + 0x9E3779B97F4A7C15 & _M64
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _M64
        h = z ^ (z >> 31)
    return h


def permutation(n: int, *key: int) -> np.ndarray:
    """Seeded Fisher-Yates permutation of range(n), identical on every platform and numpy version."""
    p = np.arange(n, dtype=np.int64)
    for i in range(n - 1, 0, -1):
        j = mix64(*key, i) % (i + 1)
        p[i], p[j] = p[j], p[i]
    return p


SHARD_FIX = ("`python -m data.shards index DIR` rebuilds missing or stale sidecar indexes; re-create or "
             "re-download a truncated shard")


class BadShard(Exception):
    """A shard cannot be read (from sample `index` on, or at all when `whole`): the tar is truncated or missing,
    its sidecar index is missing, unreadable or out of date. The pipeline skips and counts what it cannot read."""

    def __init__(self, url: str, detail: str, whole: bool = False) -> None:
        super().__init__(f"shard {url}: {detail}; fix: {SHARD_FIX}")
        self.url, self.detail, self.whole = url, detail, whole


def _is_bad_object(e: BaseException) -> bool:
    """A storage error about the object itself (gone, denied, shorter than the index says), not the service:
    transient failures that outlived the retries (StorageRetriesExhausted) and objects replaced mid-read
    (ObjectChangedError) are not the shard's fault and stay errors."""
    return isinstance(e, (ObjectNotFoundError, StorageAccessDenied)) or type(e) is StorageError


@dataclass
class ShardRef:
    name: str
    url: str
    samples: int


@dataclass
class DatasetPlan:
    """What every worker needs to know about a dataset (built once in the main process, pickled to workers)."""

    index: int
    spec: DatasetSpec
    source: str  # "shards" | "indexed"
    root: str
    shards: list[ShardRef]
    bad: list[tuple[str, str]] = field(default_factory=list)
    """Shards left out at planning (url, why): listed without a manifest but with no readable sidecar index."""

    @property
    def total(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def label(self) -> str:
        return self.spec.label


def plan_dataset(index: int, spec: DatasetSpec, storage: StorageConfig, max_bad_fraction: float = 1.0) -> DatasetPlan:
    """Read a dataset's manifest (or list its shards) and return its plan. Raises ValueError with the fix.

    NOTE: what is a startup error and what is a counted skip. Nothing readable at all (no manifest and no .tar,
    an unreadable manifest, no shard with a readable index) is an error now: training could not start anyway.
    Without a manifest the sidecar indexes are read here to count samples, so a shard whose index is missing or
    unreadable is left out of the plan, logged once with the fix, and counted (DatasetPlan.bad); only when more
    than `max_bad_fraction` of the shards are such is it an error (the fraction is exact here). With a manifest
    nothing is read per shard at startup (thousands of requests on an object store); bad shards are found, skipped
    and counted by the workers that read them (data/pipeline.py).
    """
    root = spec.path.rstrip("/")
    st = get_storage(root + "/" if "://" in root else root, storage)
    where = _where(root)
    if spec.kind != "indexed" and "://" not in root and not any(
            os.path.exists(p) for p in (root, root + ".idx", root + ".bin")):
        raise ValueError(f"dataset {spec.path!r}: no {MANIFEST} and no .tar shards found: {where} does not exist; "
                         "give the directory of its shards (made by `python -m data.shards make`) or the prefix of "
                         "a megatron .bin/.idx dataset")
    if spec.kind == "indexed" or (spec.kind == "auto" and st.exists(root + ".idx")):
        if not (st.exists(root + ".idx") and st.exists(root + ".bin")):
            raise ValueError(f"dataset {spec.path!r} (kind indexed): {root}.idx / {root}.bin not found (prefix "
                             f"{where}); give the prefix of a megatron indexed dataset (without .bin/.idx)")
        idx = IndexedText(root, storage)
        n = len(idx)
        name = os.path.basename(root)
        shards = [ShardRef(f"{name}@{b}", root, min(INDEXED_BLOCK, n - b)) for b in range(0, n, INDEXED_BLOCK)]
        return DatasetPlan(index, spec, "indexed", root, shards)
    man_url = join_url(root, MANIFEST)
    bad: list[tuple[str, str]] = []
    if st.exists(man_url):
        try:
            man = json.loads(st.read(man_url))
            shards = [ShardRef(s["name"], join_url(root, s["name"]), int(s["samples"])) for s in man["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"dataset {spec.path!r}: {man_url} is not a readable manifest ({type(e).__name__}: "
                             f"{e}); rebuild it with `python -m data.shards index DIR`") from None
    else:
        urls = [u for u in st.list(root + "/") if u.endswith(".tar")] if _is_dir(st, root) else []
        if not urls:
            raise ValueError(
                f"dataset {spec.path!r}: no {MANIFEST} and no .tar shards found in {where}; make shards with "
                "`python -m data.shards make ...` or index existing ones with `python -m data.shards index DIR`"
            )
        shards = []
        for u in urls:
            iu = u + INDEX_SUFFIX
            try:
                n = len(json.loads(st.read(iu))["samples"]) if st.exists(iu) else None
            except (ValueError, KeyError, TypeError) as e:
                bad.append((u, f"its sidecar index {iu} is unreadable ({type(e).__name__})"))
                continue
            if n is None:
                bad.append((u, f"it has no sidecar index {iu}"))
                continue
            shards.append(ShardRef(os.path.basename(u), u, n))
        for u, why in bad:
            log.warning("dataset %r: shard %s is left out: %s; fix: %s", spec.label, u, why, SHARD_FIX)
        if not shards:
            raise ValueError(f"dataset {spec.path!r}: none of its {len(urls)} shards has a readable sidecar index "
                             f"(e.g. {bad[0][0]}: {bad[0][1]}): run `python -m data.shards index DIR`")
        if len(bad) > max_bad_fraction * len(urls):
            raise ValueError(
                f"dataset {spec.path!r}: {len(bad)} of its {len(urls)} shards have no readable sidecar index (e.g. "
                f"{bad[0][0]}), more than data.max_bad_shard_fraction={max_bad_fraction}: run "
                "`python -m data.shards index DIR`, or raise the limit to train on the rest"
            )
    shards = [s for s in shards if s.samples > 0]
    if not shards:
        raise ValueError(f"dataset {spec.path!r} has no samples")
    return DatasetPlan(index, spec, "shards", root, shards, bad)


def _where(path: str) -> str:
    """The path as the error should name it: absolute, saying so when it was resolved from a relative one."""
    local = path[len("file://"):] if path.startswith("file://") else path
    if "://" in local or os.path.isabs(local):
        return local
    return f"{os.path.abspath(local)} ({local!r} is relative to the working directory {os.getcwd()})"


def _is_dir(st, root: str) -> bool:
    return "://" in root or os.path.isdir(root[len("file://") :] if root.startswith("file://") else root)


class EpochLayout:
    """The sample sequence of one epoch: shards in a seeded order, and each global worker's slice of it."""

    def __init__(self, plan: DatasetPlan, seed: int, epoch: int) -> None:
        self.order = permutation(len(plan.shards), seed, plan.index, epoch, 0x5AD)
        counts = np.asarray([plan.shards[i].samples for i in self.order], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.total = int(self.starts[-1])

    def slice(self, g: int, G: int) -> tuple[int, int]:
        return g * self.total // G, (g + 1) * self.total // G

    def locate(self, pos: int) -> tuple[int, int]:
        """(shard index in plan.shards, sample index within it) of position `pos`."""
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        return int(self.order[k]), pos - int(self.starts[k])

    def shard_end(self, pos: int) -> int:
        """First position after the shard that holds `pos`."""
        k = int(np.searchsorted(self.starts, pos, side="right")) - 1
        return int(self.starts[k + 1])


class Reader:
    """Reads samples of one dataset by (shard, index): sequential chunks when streaming, ranged reads otherwise.

    Holds at most one read-ahead chunk and a few shard indexes, so memory is bounded by read_chunk_bytes.
    """

    def __init__(self, plan: DatasetPlan, storage: StorageConfig, chunk_bytes: int, max_open_indexes: int = 8):
        self.plan = plan
        self.storage = storage
        self.chunk_bytes = chunk_bytes
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()
        self._max_idx = max_open_indexes
        self._chunk: dict[tuple[int, int], RawSample] = {}
        self._indexed: IndexedText | None = None
        self.bytes_read = 0
        self.requests = 0

    def _index(self, shard: int) -> ShardIndex:
        idx = self._indexes.get(shard)
        if idx is None:
            ref = self.plan.shards[shard]
            url = ref.url + INDEX_SUFFIX
            try:
                idx = ShardIndex.from_json(json.loads(get_storage(url, self.storage).read(url)))
            except StorageError as e:
                if not _is_bad_object(e):
                    raise
                raise BadShard(ref.url, f"its sidecar index cannot be read ({e})", whole=True) from None
            except (ValueError, KeyError, TypeError) as e:
                raise BadShard(ref.url, f"its sidecar index {url} is unreadable ({type(e).__name__}: {e})",
                               whole=True) from None
            self.requests += 1
            if len(idx) != ref.samples:
                raise BadShard(ref.url, f"its sidecar index lists {len(idx)} samples but the manifest says "
                                        f"{ref.samples} (the index or the manifest is out of date)", whole=True)
            self._indexes[shard] = idx
            if len(self._indexes) > self._max_idx:
                self._indexes.popitem(last=False)
        else:
            self._indexes.move_to_end(shard)
        return idx

    def read(self, shard: int, i: int, upto: int | None = None) -> RawSample:
        """Sample i of a shard. With `upto`, also read ahead samples i+1 .. upto-1 of the same shard (one
        request, at most chunk_bytes) and serve them from memory on the next calls. Raises BadShard."""
        raw = self._chunk.pop((shard, i), None)
        if raw is not None:
            return raw
        if self.plan.source == "indexed":
            return self._read_indexed(shard, i)
        idx = self._index(shard)
        end = i + 1
        if upto is not None:
            limit = int(idx.offsets[i]) + max(self.chunk_bytes, int(idx.sizes[i]))
            while end < min(upto, len(idx)) and int(idx.offsets[end] + idx.sizes[end]) <= limit:
                end += 1
        self._chunk = {}
        for j, raw in zip(range(i, end), self._read_prefix(shard, idx, i, end)):
            self._chunk[(shard, j)] = raw
        return self._chunk.pop((shard, i))

    def _read_prefix(self, shard: int, idx: ShardIndex, i: int, end: int) -> list[RawSample]:
        """Samples i .. end-1, or the readable ones among the first of them: when the range cannot be read (a
        truncated shard, a stale index), the samples are read one by one up to the first that fails, so what is
        readable is the same whatever the chunking. Raises BadShard when sample i itself cannot be read."""
        try:
            return self._read_range(shard, idx, i, end)
        except BadShard:
            if end - i == 1:
                raise
        out = []
        for j in range(i, end):
            try:
                out.extend(self._read_range(shard, idx, j, j + 1))
            except BadShard:
                if j == i:
                    raise
                break
        return out

    def read_many(self, refs: list[tuple[int, int]]) -> list[RawSample | None]:
        """Random access to several samples (restore): neighbours in a shard share one ranged read. A sample that
        can no longer be read (the shard changed since the state was saved) is None."""
        out: dict[tuple[int, int], RawSample | None] = {}
        by_shard: dict[int, list[int]] = {}
        for s, i in refs:
            by_shard.setdefault(s, []).append(i)
        for s, idxs in by_shard.items():
            if self.plan.source == "indexed":
                for i in idxs:
                    out[(s, i)] = self._read_indexed(s, i)
                continue
            try:
                idx = self._index(s)
            except BadShard:
                continue
            idxs = sorted(set(idxs))
            run = [idxs[0]]
            for i in idxs[1:] + [None]:  # type: ignore[list-item]
                span = None if i is None else int(idx.offsets[i] + idx.sizes[i] - idx.offsets[run[0]])
                if i is not None and span <= self.chunk_bytes and i - run[-1] <= 8:
                    run.append(i)
                    continue
                try:
                    got = self._read_prefix(s, idx, run[0], run[-1] + 1)
                except BadShard:
                    got = []
                for j, raw in zip(range(run[0], run[-1] + 1), got):
                    if j in run:
                        out[(s, j)] = raw
                if i is not None:
                    run = [i]
        return [out.get(r) for r in refs]

    def _read_range(self, shard: int, idx: ShardIndex, i: int, end: int) -> list[RawSample]:
        ref = self.plan.shards[shard]
        start = int(idx.offsets[i])
        stop = int(idx.offsets[end - 1] + idx.sizes[end - 1])
        try:
            buf = get_storage(ref.url, self.storage).read_range(ref.url, start, stop - start)
        except StorageError as e:
            if not _is_bad_object(e):
                raise
            raise BadShard(ref.url, f"sample {idx.keys[i]!r} cannot be read ({e}): the shard is truncated or "
                                    "gone, or its index is out of date") from None
        self.requests += 1
        self.bytes_read += len(buf)
        if len(buf) != stop - start:
            raise BadShard(ref.url, f"short read: {len(buf)} of {stop - start} bytes at {start} (truncated?)")
        mv = memoryview(buf)
        out = []
        for j in range(i, end):
            o = int(idx.offsets[j]) - start
            view = mv[o : o + int(idx.sizes[j])]
            where = f"{ref.url} sample {idx.keys[j]!r}"
            try:
                check_header(view[:512], where)
                _check_member_name(view[:512], f"{idx.keys[j]}.{idx.members[j][0][0]}", where)
            except ValueError as e:
                raise BadShard(ref.url, f"sample {idx.keys[j]!r}: {e}") from None
            out.append(RawSample(f"{self.plan.label}/{ref.name}/{idx.keys[j]}", split_sample(view, idx.members[j]),
                                 root=self.plan.root, nbytes=int(idx.sizes[j])))
        return out

    def _read_indexed(self, shard: int, i: int) -> RawSample:
        if self._indexed is None:
            self._indexed = IndexedText(self.plan.root, self.storage)
        seq = shard * INDEXED_BLOCK + i
        tokens = self._indexed[seq]
        self.requests += 1
        self.bytes_read += int(tokens.nbytes)
        return RawSample(f"{self.plan.label}/{seq}", tokens=tokens, root=self.plan.root, nbytes=int(tokens.nbytes))


def _check_member_name(block: bytes | memoryview, expected: str, where: str) -> None:
    """The tar header at a sample's offset must name the sample's first member: a shard rewritten after indexing
    whose headers happen to land on the old offsets still fails here. Only plain ustar headers carry the name
    (a PAX or GNU long-name header before the member holds it elsewhere; those pass)."""
    b = bytes(block)
    if b[156:157] not in (b"0", b"\0"):
        return
    name = b[0:100].split(b"\0", 1)[0]
    prefix = b[345:500].split(b"\0", 1)[0] if b[257:263] == b"ustar\0" else b""  # GNU headers: no prefix field
    found = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
    if found != expected:
        raise ValueError(f"{where}: the tar header at the indexed offset is {found!r}, not {expected!r}: the sidecar "
                         "index is out of date")
