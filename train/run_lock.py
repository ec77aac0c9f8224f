"""One training per run directory: an exclusive lock file, shared filesystems included (issue 22).

    lock = acquire_run_lock([run_dir, checkpoint_dir], is_main=rank == 0)   # every rank calls it
    ...
    release_run_lock(lock)

Two trainings started on the same run_dir used to both run: the second overwrote the first's checkpoints. Now
rank 0 creates `DIR/run.lock` with O_CREAT | O_EXCL (atomic on local filesystems and on NFSv3+, Lustre, GPFS), and
the other ranks learn the outcome through the process group, so every rank of one job shares one lock. The file
names its holder (JSON): host, PID and the PID's start time, the machine (boot id and PID namespace), the job
(SLURM_JOB_ID, else torchrun's TORCHELASTIC_RUN_ID) and its attempt (SLURM_RESTART_COUNT,
TORCHELASTIC_RESTART_COUNT), the start time and a random token. A thread touches the file's mtime every
HEARTBEAT_S: the heartbeat.

A lock that exists is taken over, with a warning naming the old holder, when it is stale:
  - it is this process's own (a Trainer of this process that was not closed);
  - it belongs to an earlier attempt of the same job: torchrun --max-restarts or a SLURM requeue after a crash
    or a kill -9 (new PIDs, maybe another host for rank 0, the old heartbeat still fresh);
  - its holder ran on this machine and its PID is dead (or now belongs to another process: the start time
    differs);
  - its heartbeat is older than STALE_AFTER_S (a holder on another host that died or lost the filesystem).
Otherwise the run refuses with one line naming the holder (RunDirLocked, a ConfigError: exit 2).

Breaking a stale lock is serialized by a second O_EXCL file (`run.lock.break`) and re-checks the lock is the one
judged stale, so two runs that find the same stale lock cannot both take over.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from core.config import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0
"""The holder touches its lock file this often."""
STALE_AFTER_S = 120.0
"""A heartbeat older than this releases the lock (generous: clocks of hosts sharing a filesystem differ)."""
_BREAK_STALE_S = 30.0  # a break guard older than this was left by a process that died while breaking
_TRIES = 6


class RunDirLocked(ConfigError):
    """Another training holds the run directory; the message names it and what to do."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock (the lock file's content)."""

    host: str
    pid: int
    pid_start: int | None
    machine: str
    job: str | None
    attempt: list[int]
    started_at: str
    token: str

    def describe(self) -> str:
        job = f", job {self.job}" if self.job else ""
        return f"pid {self.pid} on host {self.host}{job}, started {self.started_at}"


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (Linux), to tell a reused PID from its first owner."""
    stat = _read_text(f"/proc/{pid}/stat")
    try:
        return int(stat.rsplit(")", 1)[1].split()[19]) if stat else None
    except (IndexError, ValueError):
        return None


def _machine() -> str:
    """This machine and PID namespace: a PID is only meaningful within both."""
    boot = _read_text("/proc/sys/kernel/random/boot_id") or socket.gethostname()
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return f"{boot}/{ns}"


def _job() -> tuple[str | None, list[int]]:
    """(the job this process belongs to, its attempt): restarts of one job share the id, with a higher attempt."""
    attempt = [int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
               int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}", attempt
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":  # torchrun's default id without --rdzv-id is the same for every job
        return f"torchrun:{run_id}", attempt
    return None, attempt


def this_holder() -> Holder:
    job, attempt = _job()
    return Holder(host=socket.gethostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()), machine=_machine(),
                  job=job, attempt=attempt, started_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                  token=secrets.token_hex(8))


def _pid_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return start is None or _pid_start(pid) in (None, start)


def stale_reason(holder: Holder, age_s: float, me: Holder) -> str | None:
    """Why a lock held by `holder` (heartbeat `age_s` old) may be taken over by `me`, or None if it is live."""
    if holder.machine == me.machine and holder.pid == me.pid:
        return "it is this process's own"
    if holder.job is not None and holder.job == me.job and list(me.attempt) > list(holder.attempt):
        return f"it belongs to an earlier attempt of this job ({holder.job}: a restart)"
    if holder.machine == me.machine and not _pid_alive(holder.pid, holder.pid_start):
        return "its process is gone"
    if age_s > STALE_AFTER_S:
        return f"its heartbeat stopped {age_s:.0f} s ago"
    return None


@dataclass
class _Seen:
    raw: str
    mtime: float


def _read_lock(path: Path) -> tuple[_Seen, Holder | None] | None:
    """The lock file's content and holder (None: unparseable, e.g. being written); None when there is no file."""
    try:
        st = path.stat()
        raw = path.read_text()
    except FileNotFoundError:
        return None
    try:
        d = json.loads(raw)
        holder = Holder(**{k: d[k] for k in Holder.__dataclass_fields__})
    except (ValueError, KeyError, TypeError):
        holder = None
    return _Seen(raw, st.st_mtime), holder


def _break(path: Path, seen: _Seen) -> None:
    """Remove the lock judged stale, unless it changed since (another run took it over meanwhile)."""
    guard = path.with_name(path.name + ".break")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(OSError):
            if time.time() - guard.stat().st_mtime > _BREAK_STALE_S:
                guard.unlink()
        time.sleep(0.1)
        return
    try:
        os.close(fd)
        now = _read_lock(path)
        if now is not None and now[0] == seen:
            path.unlink()
    finally:
        with contextlib.suppress(FileNotFoundError):
            guard.unlink()


class RunLock:
    """A lock held by this process on one directory; its heartbeat thread runs until release()."""

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"run-lock {path.parent}", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _mine(self) -> bool:
        got = _read_lock(self.path)
        return got is not None and got[1] is not None and got[1].token == self.holder.token

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._mine():
                log.error("the lock %s is no longer this run's (taken over after its heartbeat stopped for %.0f s?): "
                          "another training may now write into %s", self.path, STALE_AFTER_S, self.path.parent)
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours (idempotent; owner process only)."""
        if self._stop.is_set() or os.getpid() != self.holder.pid:
            return
        self._stop.set()
        with contextlib.suppress(Exception):
            atexit.unregister(self.release)
        if self._mine():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def lock_dir(directory: str | Path, holder: Holder | None = None) -> RunLock:
    """Take `directory`'s lock for this process (see the module doc); RunDirLocked names a live holder."""
    me = holder or this_holder()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_NAME
    content = json.dumps(asdict(me), indent=1)
    for _ in range(_TRIES):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            return RunLock(path, me)
        got = _read_lock(path)
        if got is None:  # released in between: try again
            continue
        seen, other = got
        age = time.time() - seen.mtime
        if other is None:  # being written right now, or garbage: live while fresh
            if age <= STALE_AFTER_S:
                time.sleep(0.2)
                continue
            why = f"it is unreadable and {age:.0f} s old"
        else:
            why = stale_reason(other, age, me)
            if why is None:
                raise RunDirLocked(
                    f"run_dir {d} is in use by another training: {other.describe()} (lock {path}, heartbeat "
                    f"{max(age, 0):.0f} s ago); wait for it to end or choose another run_dir. If that run is gone "
                    f"(its host unreachable), the lock is released {STALE_AFTER_S:.0f} s after its last heartbeat, "
                    f"or delete {path}"
                )
        own = other is not None and other.machine == me.machine and other.pid == me.pid
        (log.info if own else log.warning)("taking over the lock %s%s: %s", path,
                                           f" of {other.describe()}" if other else "", why)
        _break(path, seen)
    raise RunDirLocked(f"could not take the lock {path}: other processes keep creating and removing it; is another "
                       "training starting in the same run_dir?")


def _distinct(dirs: Sequence[str | Path]) -> list[Path]:
    """The directories to lock: each once, none inside another that is locked already."""
    out: list[Path] = []
    for d in (Path(x).resolve() for x in dirs):
        if not any(d == o or o in d.parents for o in out):
            out.append(d)
    return out


def acquire_run_lock(dirs: Sequence[str | Path], is_main: bool, device=None) -> list[RunLock]:
    """Every rank calls this: rank 0 locks each directory, the others learn the outcome through the default
    process group (so a refusal stops every rank with the same one line). Returns rank 0's locks ([] elsewhere)."""
    import torch.distributed as dist

    locks: list[RunLock] = []
    error: str | None = None
    if is_main:
        try:
            for d in _distinct(dirs):
                locks.append(lock_dir(d))
        except RunDirLocked as e:
            release_run_lock(locks)
            locks, error = [], str(e)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0, device=device)
        error = box[0]
    if error is not None:
        raise RunDirLocked(error)
    return locks


def release_run_lock(locks: Sequence[RunLock] | None) -> None:
    for lk in locks or ():
        lk.release()
