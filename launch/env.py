"""One rendezvous environment from whichever launcher started us.

`python -m train` reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT (torch's env://
rendezvous). Launchers provide them differently:

- torchrun / torch elastic: already set (plus TORCHELASTIC_RESTART_COUNT on restarts);
- the DeepSpeed launcher (`deepspeed --num_gpus N --module train RECIPE ...`): sets RANK, LOCAL_RANK,
  WORLD_SIZE, MASTER_ADDR, MASTER_PORT and also passes `--local_rank=<n>` on the command line, which we accept
  and strip (it must agree with LOCAL_RANK when both are given);
- SLURM `srun` with one task per GPU (no torchrun): SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the master
  is the first host of SLURM_JOB_NODELIST (or SLURM_STEP_NODELIST) and the port is derived from the job id
  unless MASTER_PORT is set;
- Open MPI `mpirun`: OMPI_COMM_WORLD_RANK / _SIZE / _LOCAL_RANK (MASTER_ADDR must be exported);
- nothing: one process (world size 1), no launcher needed.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping


def strip_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """Remove DeepSpeed's `--local_rank=N` / `--local_rank N` (or `--local-rank`) from argv."""
    out, local_rank, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        m = re.fullmatch(r"--local[_-]rank(?:=(\d+))?", a)
        if m:
            if m.group(1) is not None:
                local_rank = int(m.group(1))
            else:
                if i + 1 >= len(argv) or not argv[i + 1].isdigit():
                    raise ValueError(f"{a} needs an integer value")
                local_rank = int(argv[i + 1])
                i += 1
        else:
            out.append(a)
        i += 1
    return out, local_rank


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def detect_launcher(env: MutableMapping[str, str]) -> str:
    if "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env:
        return "torchrun"
    if "CROSS_RANK" in env and "RANK" in env:
        return "deepspeed"
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return "slurm"
    if "OMPI_COMM_WORLD_RANK" in env:
        return "mpi"
    return "single"


def resolve_env(argv: list[str], env: MutableMapping[str, str] | None = None) -> tuple[list[str], str]:
    """Normalize the rendezvous variables in `env` (os.environ by default) in place.

    Returns (argv without launcher-only flags, launcher name). Raises ValueError with the variable names
    when the launcher's variables disagree.
    """
    env = os.environ if env is None else env
    argv, ds_local_rank = strip_local_rank(argv)
    launcher = detect_launcher(env)
    if launcher == "slurm":
        env.setdefault("RANK", env["SLURM_PROCID"])
        env.setdefault("WORLD_SIZE", env["SLURM_NTASKS"])
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" not in env:
            if not nodes:
                raise ValueError("SLURM launch without MASTER_ADDR and without SLURM_JOB_NODELIST")
            env["MASTER_ADDR"] = first_host(nodes)
        # A port per job, so two jobs sharing a node do not collide.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    elif launcher == "mpi":
        env.setdefault("RANK", env["OMPI_COMM_WORLD_RANK"])
        env.setdefault("WORLD_SIZE", env["OMPI_COMM_WORLD_SIZE"])
        env.setdefault("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
        if "MASTER_ADDR" not in env:
            raise ValueError("mpirun launch: export MASTER_ADDR (and MASTER_PORT) to every rank (mpirun -x ...)")
        env.setdefault("MASTER_PORT", "29500")
    if ds_local_rank is not None:
        if "LOCAL_RANK" in env and int(env["LOCAL_RANK"]) != ds_local_rank:
            raise ValueError(f"--local_rank={ds_local_rank} disagrees with LOCAL_RANK={env['LOCAL_RANK']}")
        env["LOCAL_RANK"] = str(ds_local_rank)
    if launcher != "single":
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in env:
                raise ValueError(f"{launcher} launch: {var} is not set (set it, or start with torchrun)")
        env.setdefault("LOCAL_RANK", "0")
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return argv, launcher


def restart_count(env: MutableMapping[str, str] | None = None) -> int:
    """How many times torch elastic restarted this job (0 on the first attempt or without torchrun)."""
    env = os.environ if env is None else env
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
