"""Sharded checkpoints with torch.distributed.checkpoint (DCP): save, atomic "latest", keep_last, resume.

On disk (CKPT_DIR, shared by all nodes):

    step_00000100/          one complete checkpoint
        .metadata           DCP's global index (written last by the coordinator, after every rank's shards)
        __<rank>_0.distcp   each rank's own shards
        config.yaml         the resolved recipe of the run that wrote it
        meta.json           step, layout (dp/tp/pp), world size, time; written last: its presence = complete
    step_00000200.tmp/      a save in progress (or interrupted by a crash): never read
    latest                  name of the newest complete step directory (replaced atomically)

A save writes into `step_N.tmp`, and only after every rank's shards and the DCP metadata are on disk does
rank 0 write meta.json, rename the directory to `step_N` and replace `latest`. A crash at any point of a
save leaves the previous checkpoint as the latest complete one; stale `.tmp` directories are removed by the
next save.

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


# ------------------------------------------------------------------------------------------ manager
class CheckpointManager:
    """Saves and finds checkpoints of one run. All ranks call save/load; rank 0 does the bookkeeping."""

    def __init__(
        self,
        ckpt_dir: str | Path,
        layout: Layout,
        keep_last: int = 3,
        async_save: bool = False,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.dir = Path(ckpt_dir)
        self.layout = layout
        self.keep_last = keep_last
        self.async_save = async_save
        self.pg = process_group  # async saves run their collectives on a separate (gloo) group
        self._pending: tuple[Future, Path, Path, dict, str] | None = None
        self.save_seconds: float = 0.0  # blocking time of the last save (staging time when async)

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
        """Write `state` (flat DCP dict) as step_<step>. Returns after staging when async."""
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
        if self.async_save:
            fut = dcp.async_save(state, storage_writer=writer, process_group=self.pg)
            self._pending = (fut, tmp, final, meta, config_yaml)
        else:
            dcp.save(state, storage_writer=writer, process_group=self.pg)
            self._barrier()
            if self.is_coordinator:
                self._finalize(tmp, final, meta, config_yaml)
            self._barrier()
        self.save_seconds = time.perf_counter() - t0

    def poll(self) -> None:
        """Finish an async save whose files are all written (rank 0 renames; non-blocking)."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is complete and published."""
        if self._pending is None:
            return
        fut, tmp, final, meta, config_yaml = self._pending
        self._pending = None
        fut.result()  # re-raises a failed write: a checkpoint that failed must not be published
        # The coordinator's future completes after DCP gathered every rank's write results and wrote
        # .metadata, so every shard of every rank is on disk here.
        if self.is_coordinator:
            self._finalize(tmp, final, meta, config_yaml)

    def _finalize(self, tmp: Path, final: Path, meta: dict, config_yaml: str) -> None:
        (tmp / "config.yaml").write_text(config_yaml)
        _write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))
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
        done = list_complete(self.dir)
        for p in done[: max(0, len(done) - self.keep_last)]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    # -------------------------------------------------------------------------------- load
    def load(self, path: Path, state: dict[str, Any]) -> None:
        """Fill `state` (DCP dict: tensors in place, Stateful values through load_state_dict) from a complete
        checkpoint, without running code from it."""
        load_state(path, state, self.pg)


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
