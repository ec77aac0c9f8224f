"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save, atomic "latest", keep_last, resume.

On disk (CKPT_DIR, shared by all nodes):

    step_00000100/          one complete checkpoint
        .metadata           DCP's global index (written last by the coordinator, after every rank's shards)
        __<rank>_0.distcp   each rank's own shards
        config.yaml         the resolved recipe of the run that wrote it
        meta.json           step, layout (dp/tp/pp), world size, time, and the size + sha256 of every other file
                            (each rank hashes its own shards right after writing them); written last: its
                            presence = complete
    step_00000200.tmp/      a save in progress (or interrupted by a crash): never read
    latest                  name of the newest complete step directory (replaced atomically)

A save writes into `step_N.tmp`, and only after every rank's shards and the DCP metadata are on disk does
rank 0 write meta.json, rename the directory to `step_N` and replace `latest`. A crash at any point of a
save leaves the previous checkpoint as the latest complete one; stale `.tmp` directories are removed by the
next save. A resume verifies the checkpoint's checksums first (the ranks share the reading); with
`checkpoint.resume: auto` a damaged checkpoint is passed over, with a warning, for the newest one that verifies.

What a checkpoint holds (flat DCP keys; FQNs are the single-process model's, so any layout can load any), as
the Stateful objects of train/state.py:
    model.<fqn>                         weights (DTensor shards under TP/FSDP; each pp stage its own layers)
    optim.state.<fqn>.<stat>            AdamW state (step, exp_avg, exp_avg_sq) of trainable parameters
    optim.param_groups.<fqn>.<key>      their AdamW group settings
    trainer.<counter>                   step, skipped steps, tokens and samples seen, data pass
    schedule.<key>                      the LR schedule and AdamW settings of the run
    loader.dp<r>                        the loader state of dp rank r (one blob; only pp stage 0 has one)
    rng.rank<g>                         python / numpy / torch / CUDA RNG states of global rank g

Trust boundary: DCP pickles its `.metadata` index and every non-tensor value. Ours are read with a restricted
unpickler (DCP's own metadata classes, torch sizes and dtypes, plain containers) and `torch.load(weights_only=
True)`, so a crafted checkpoint cannot run code; it fails with an error naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import re
import shutil
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem

log = logging.getLogger(__name__)

_STEP_RE = re.compile(r"^step_(\d{8})$")
LATEST = "latest"


@dataclass(frozen=True)
class Layout:
    """Where this rank sits: the parallel degrees and this rank's coordinates."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    dp_rank: int = 0
    tp_rank: int = 0
    pp_rank: int = 0
    rank: int = 0
    world: int = 1

    @property
    def has_data(self) -> bool:
        """Only the first pipeline stage consumes microbatches."""
        return self.pp_rank == 0

    def describe(self) -> str:
        return f"dp{self.dp} x tp{self.tp} x pp{self.pp} ({self.world} ranks)"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return _STEP_RE.match(path.name) is not None and (path / ".metadata").is_file() and (path / "meta.json").is_file()


def step_dirs(ckpt_dir: Path) -> list[Path]:
    """Published step directories (complete or damaged; not the `.tmp` of a save in progress), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and _STEP_RE.match(p.name)), key=lambda p: p.name)


def list_complete(ckpt_dir: Path) -> list[Path]:
    """Complete step directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: p.name)


def latest_complete(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint: the one `latest` names if it is complete, else the newest on disk."""
    ptr = ckpt_dir / LATEST
    if ptr.is_file():
        cand = ckpt_dir / ptr.read_text().strip()
        if is_complete(cand):
            # A `latest` older than a complete dir can only come from a crash between rename and pointer
            # update; the newest complete directory is then the truth.
            newest = list_complete(ckpt_dir)[-1]
            return newest if newest.name > cand.name else cand
    done = list_complete(ckpt_dir)
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory, or a checkpoint dir / run dir whose newest complete step is meant."""
    p = Path(path)
    if is_complete(p):
        return p
    for cand_dir in (p, p / "checkpoints"):
        found = latest_complete(cand_dir)
        if found is not None:
            return found
    if p.name.endswith(".tmp"):
        raise FileNotFoundError(f"{p} is an incomplete (interrupted) checkpoint; use a complete step_* directory")
    raise FileNotFoundError(f"no complete checkpoint at {p} (expected a step_* dir with .metadata and meta.json)")


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


# ------------------------------------------------------------------------------------------ safe reading
class UnsafeCheckpointError(ValueError):
    """A checkpoint file refers to code that loading would run: it was crafted or is not ours."""


_SAFE_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"), ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's .metadata, refusing every global but DCP's metadata classes, sizes and dtypes."""

    def __init__(self, f, where: str) -> None:
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        ok = (module, name) in _SAFE_GLOBALS or module == "torch.distributed.checkpoint.metadata" or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not ok:
            raise UnsafeCheckpointError(
                f"{self.where} refers to {module}.{name}, which loading a checkpoint never needs: the file was "
                "crafted or is not a torch.distributed.checkpoint index; refusing to load it"
            )
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """FileSystemReader whose metadata is read without running code (see the module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, str(path)).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads non-tensor values with torch.load(weights_only=True)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element

        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"checkpoint value {read_item.dest_index.fqn!r} is not plain data ({e}); refusing to load it"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def checkpoint_keys(path: Path) -> set[str]:
    """Every key stored in a checkpoint (from DCP's metadata; no tensor is read)."""
    return set(SafeReader(str(path)).read_metadata().state_dict_metadata)


def load_state(path: Path, state: dict[str, Any], process_group: dist.ProcessGroup | None = None,
               no_dist: bool = False) -> None:
    """dcp.load through the safe reader and planner: fills `state` (tensors in place, Stateful values through
    their load_state_dict)."""
    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner(), process_group=process_group,
             no_dist=no_dist)


# ------------------------------------------------------------------------------------------ integrity
_SUMS = ".sums"
_HASH_CHUNK = 8 << 20


def file_digest(path: Path) -> dict[str, Any]:
    """{"size", "sha256"} of one file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _own_files(tmp: Path, rank: int) -> list[Path]:
    """The shard files a rank wrote: DCP's FileSystemWriter names them __<rank>_<n>.distcp."""
    return sorted(p for p in tmp.glob(f"__{rank}_*") if p.is_file())


def _write_own_sums(tmp: Path, rank: int) -> None:
    """Each rank hashes the files it wrote, right after writing them (in parallel over ranks, not by rank 0 alone),
    into a small sidecar that the coordinator merges into meta.json."""
    sums = {p.name: file_digest(p) for p in _own_files(tmp, rank)}
    d = tmp / _SUMS
    d.mkdir(exist_ok=True)
    _write_atomic(d / f"rank{rank}.json", json.dumps(sums))


def _collect_sums(tmp: Path, world: int, timeout_s: float) -> dict[str, Any]:
    """Merge every rank's sidecar (waiting up to timeout_s for ranks still hashing, async saves)."""
    deadline = time.monotonic() + timeout_s
    files: dict[str, Any] = {}
    for r in range(world):
        p = tmp / _SUMS / f"rank{r}.json"
        while not p.is_file():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {r} did not record the checksums of its checkpoint files in {tmp} within "
                                   f"{timeout_s:.0f}s")
            time.sleep(0.05)
        files.update(json.loads(p.read_text()))
    return files


def verify_checkpoint(path: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems found in a complete checkpoint: an unreadable meta.json, and files missing, truncated or altered
    since their checksums were recorded. With world > 1, rank r checks every world-th file (the caller gathers).
    An empty list means verified."""
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as e:
        return [f"{path / 'meta.json'} is unreadable ({type(e).__name__}: {e})"]
    files = meta.get("files")
    if not isinstance(files, dict) or ".metadata" not in files:
        return [f"{path / 'meta.json'} records no file checksums (a checkpoint of an older version or altered)"]
    problems = []
    for name in sorted(files)[rank::world]:
        want, p = files[name], path / name
        if not p.is_file():
            problems.append(f"{p} is missing")
            continue
        size = p.stat().st_size
        if size != want["size"]:
            problems.append(f"{p} has {size} bytes, {want['size']} were saved (truncated or zero-byte)")
        elif file_digest(p)["sha256"] != want["sha256"]:
            problems.append(f"{p} does not match its checksum (altered or bit-flipped since the save)")
    return problems


# ------------------------------------------------------------------------------------------ manager
class CheckpointManager:
    """Saves, verifies and finds checkpoints of one run. All ranks call save/load/verify; rank 0 does the
    bookkeeping."""

    def __init__(
        self,
        ckpt_dir: str | Path,
        layout: Layout,
        keep_last: int = 3,
        async_save: bool = False,
        process_group: dist.ProcessGroup | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.dir = Path(ckpt_dir)
        self.layout = layout
        self.keep_last = keep_last
        self.async_save = async_save
        self.pg = process_group  # async saves run their collectives on a separate (gloo) group
        self.timeout_s = timeout_s
        self._pending: tuple[Future, Path, Path, dict, str] | None = None
        self._pending_hashed = False
        self.save_seconds: float = 0.0  # blocking time of the last save (staging time when async)
        self.protected: Path | None = None
        """A checkpoint keep_last must never prune (the last one saved before a run started skipping steps)."""

    # -------------------------------------------------------------------------------- helpers
    def _barrier(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier(group=self.pg)

    @property
    def is_coordinator(self) -> bool:
        return self.layout.rank == 0

    def latest(self) -> Path | None:
        return latest_complete(self.dir)

    # -------------------------------------------------------------------------------- save
    def save(self, step: int, state: dict[str, Any], config_yaml: str, extra_meta: dict | None = None) -> None:
        """Write `state` (DCP dict of tensors and Stateful objects) as step_<step>. Returns after staging when
        async. A failed write (disk full, I/O error) raises CheckpointSaveError and leaves the previous
        checkpoint the latest."""
        self.wait()  # one save in flight at a time (DCP requirement, and bounded host memory)
        t0 = time.perf_counter()
        final = self.dir / step_dir_name(step)
        tmp = final.with_name(final.name + ".tmp")
        if self.is_coordinator:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            if final.exists():  # re-saving a step (a resumed run that re-ran it): replace atomically below
                log.warning("checkpoint %s exists and will be replaced", final)
        self._barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        meta = {
            "step": step,
            "layout": asdict(self.layout) | {"rank": None, "dp_rank": None, "tp_rank": None, "pp_rank": None},
            "world_size": self.layout.world,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "torch": torch.__version__,
            **(extra_meta or {}),
        }
        writer = FileSystemWriter(str(tmp))
        with _save_errors(tmp, self.latest()):
            if self.async_save:
                fut = dcp.async_save(state, storage_writer=writer, process_group=self.pg)
                self._pending, self._pending_hashed = (fut, tmp, final, meta, config_yaml), False
            else:
                dcp.save(state, storage_writer=writer, process_group=self.pg)
                _write_own_sums(tmp, self.layout.rank)
                self._barrier()
                if self.is_coordinator:
                    self._finalize(tmp, final, meta, config_yaml)
                self._barrier()
        self.save_seconds = time.perf_counter() - t0

    def poll(self) -> None:
        """Advance an async save without blocking: hash this rank's files once they are written; the coordinator
        publishes once every rank has."""
        if self._pending is None or not self._pending[0].done():
            return
        fut, tmp, final, meta, config_yaml = self._pending
        if not self._pending_hashed:
            with _save_errors(tmp, self.latest()):
                fut.result()
                _write_own_sums(tmp, self.layout.rank)
            self._pending_hashed = True
        if not self.is_coordinator:
            self._pending = None
        elif all((tmp / _SUMS / f"rank{r}.json").is_file() for r in range(self.layout.world)):
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is complete and published."""
        if self._pending is None:
            return
        fut, tmp, final, meta, config_yaml = self._pending
        with _save_errors(tmp, self.latest()):
            fut.result()  # re-raises a failed write: a checkpoint that failed must not be published
            if not self._pending_hashed:
                _write_own_sums(tmp, self.layout.rank)
        self._pending = None
        # The coordinator's future completes after DCP gathered every rank's write results and wrote .metadata,
        # so every shard of every rank is on disk; their checksums follow from each rank's own wait()/poll().
        if self.is_coordinator:
            self._finalize(tmp, final, meta, config_yaml)

    def _finalize(self, tmp: Path, final: Path, meta: dict, config_yaml: str) -> None:
        (tmp / "config.yaml").write_text(config_yaml)
        files = _collect_sums(tmp, self.layout.world, self.timeout_s)
        for name in (".metadata", "config.yaml"):
            files[name] = file_digest(tmp / name)
        shutil.rmtree(tmp / _SUMS, ignore_errors=True)
        _write_atomic(tmp / "meta.json", json.dumps({**meta, "files": dict(sorted(files.items()))}, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        _write_atomic(self.dir / LATEST, final.name + "\n")
        log.info("checkpoint %s complete", final)
        self._prune(keep=final)

    def _prune(self, keep: Path) -> None:
        for p in self.dir.iterdir():
            # Stale partial saves (a crash mid-save) of steps other than an in-flight one.
            if p.is_dir() and p.name.endswith(".tmp") and (self._pending is None or p != self._pending[1]):
                shutil.rmtree(p, ignore_errors=True)
        if self.keep_last <= 0:
            return
        done = [p for p in list_complete(self.dir) if p != self.protected]
        for p in done[: max(0, len(done) - self.keep_last)]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    # -------------------------------------------------------------------------------- verify + load
    def verify(self, path: Path) -> list[str]:
        """verify_checkpoint over all ranks (each checks a share of the files); the same list on every rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.pg) == 1:
            return verify_checkpoint(path)
        world = dist.get_world_size(self.pg)
        mine = verify_checkpoint(path, dist.get_rank(self.pg), world)
        gathered: list[list[str] | None] = [None] * world
        dist.all_gather_object(gathered, mine, group=self.pg)
        return [p for g in gathered for p in (g or [])]

    def newest_verified(self) -> tuple[Path | None, list[str]]:
        """The newest complete checkpoint that verifies, and a warning line per newer one that did not."""
        rejected: list[str] = []
        for cand in reversed(list_complete(self.dir)):
            problems = self.verify(cand)
            if not problems:
                return cand, rejected
            rejected.append(f"{cand.name}: {'; '.join(problems[:3])}")
        return None, rejected

    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Fill `state` (DCP dict: tensors in place, Stateful values through load_state_dict) from a complete
        checkpoint, without running code from it."""
        load_state(path, state, self.pg)


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed; the previous complete checkpoint stays the latest."""


@contextlib.contextmanager
def _save_errors(tmp: Path, previous: Path | None):
    """Turn a failed write into one clear line: ENOSPC (which torch's zip writer reports as `unexpected pos N vs
    M`) says so, with the free space left, and every failure says which checkpoint stays the one to resume."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException wrapping the OSError
        chain, todo = [], [e]
        while todo and len(chain) < 20:
            cur = todo.pop(0)
            chain.append(cur)
            # DCP's CheckpointException carries each rank's own exception in .failures (not as a cause).
            wrapped = [f[0] if isinstance(f, tuple) else f for f in getattr(cur, "failures", {}).values()]
            todo += [c for c in (cur.__cause__, cur.__context__, *wrapped) if isinstance(c, BaseException)]
        text = " ".join(str(c) for c in chain)
        try:
            free = shutil.disk_usage(tmp if tmp.exists() else tmp.parent).free
        except OSError:
            free = -1
        nospace = any(getattr(c, "errno", None) == errno.ENOSPC for c in chain) or "No space left" in text or (
            "unexpected pos" in text and 0 <= free < 64 << 20)
        keep = f"the previous checkpoint {previous} stays the latest" if previous else "no earlier checkpoint exists"
        if nospace:
            raise CheckpointSaveError(
                errno.ENOSPC, f"checkpoint save to {tmp} failed: no space left on device ({free / 2**20:.1f} MiB "
                f"free); {keep}. Free space or point checkpoint.dir at a larger filesystem") from e
        root = next((c for c in reversed(chain) if str(c)), e)
        detail = " ".join(f"{type(root).__name__}: {root}".split())[:500]
        raise CheckpointSaveError(f"checkpoint save to {tmp} failed: {detail}; {keep}") from e


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
