"""Spawn N gloo processes running a worker function, the way torchrun would (RANK/WORLD_SIZE/... env).

Children are forked from a forkserver that imported torch, the model and the engine once (preload), so a
test pays the ~3-10 s torch import once per session instead of once per rank. Each child sets
OMP_NUM_THREADS=1 and one torch thread, gets a free port, runs `fn(rank, world_size, *args)`, and sends back
its return value or its traceback. The parent waits at most `timeout` seconds, kills what is left, and
raises with every failing rank's traceback, so a broken layout can never hang the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

_PRELOAD = ["torch", "torch.distributed.fsdp", "torch.distributed.tensor.parallel", "torch.distributed.checkpoint",
            "model.qwen2_vl", "parallel", "_synth", "_workers"]


_OWN_FORKSERVER = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world: int, port: int, args: tuple, q, extra_env: dict) -> None:
    os.environ.update(
        {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
         "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **extra_env}
    )
    import torch

    torch.set_num_threads(1)
    try:
        out = fn(rank, world, *args)
        q.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        q.put((rank, "err", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            from parallel import destroy_distributed

            if dist.is_initialized():
                destroy_distributed()
        except Exception:  # noqa: BLE001
            pass
    # Flush the result, then skip interpreter teardown (gloo threads of a failed group can block it).
    q.close()
    q.join_thread()
    os._exit(0)


def run_distributed(fn: Callable, world: int, *args: Any, timeout: float = 120.0,
                    extra_env: dict | None = None) -> list[Any]:
    """Run fn(rank, world, *args) in `world` spawned processes; return the results by rank."""
    global _OWN_FORKSERVER
    from multiprocessing import forkserver

    running = getattr(forkserver._forkserver, "_forkserver_pid", None) is not None
    if running and not _OWN_FORKSERVER:
        # Someone else started the (process-wide) forkserver with their sys.path: it may not import this
        # folder's modules, so fall back to spawn (slower, always correct).
        ctx = mp.get_context("spawn")
    else:
        ctx = mp.get_context("forkserver")
        # NOTE: must be set before the forkserver starts (first use); a running server ignores it.
        ctx.set_forkserver_preload(_PRELOAD)
        _OWN_FORKSERVER = True
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, q, extra_env or {})) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while len(results) < world and time.monotonic() < deadline:
        try:
            rank, status, payload = q.get(timeout=0.5)
            results[rank] = (status, payload)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and q.empty():
                break
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    errors = [f"--- rank {r} ---\n{payload}" for r, (status, payload) in sorted(results.items()) if status == "err"]
    missing = [r for r in range(world) if r not in results]
    if errors or missing:
        msg = "\n".join(errors)
        if missing:
            msg += f"\nranks {missing} reported nothing within {timeout:.0f}s (killed)"
        raise AssertionError(msg)
    return [results[r][1] for r in range(world)]
