"""Where this process sits, from whichever launcher started it: the one launcher-environment resolver.

Launchers understood (first match wins):
- torchrun / torch.distributed.run (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; TORCHELASTIC_* on
  restarts), and anything else that sets RANK + WORLD_SIZE (env://);
- the DeepSpeed launcher (`deepspeed --num_gpus N --module train ...`): the same variables plus `--local_rank=N`
  on the command line (in old releases instead of LOCAL_RANK); the two must agree;
- MPI launchers (`deepspeed --launcher openmpi/mvapich`, mpirun): OMPI_COMM_WORLD_* / MV2_COMM_WORLD_* /
  PMI_* (MASTER_ADDR must be exported; MASTER_PORT defaults to 29500);
- srun without torchrun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; the master is the first host of
  SLURM_STEP_NODELIST / SLURM_JOB_NODELIST and the port is derived from the job id (two jobs sharing a node
  never collide) unless MASTER_ADDR / MASTER_PORT are set;
- nothing set: one process (world size 1), no launcher needed.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, as the launcher told it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    launcher: str


def strip_local_rank(argv: Sequence[str]) -> tuple[list[str], int | None]:
    """argv without DeepSpeed's `--local_rank=N` / `--local_rank N` (or `--local-rank`), and N."""
    out, local_rank, i = [], None, 0
    argv = list(argv)
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
    return prefix + ranges.split(",")[0].split("-")[0]


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for n in names:
        if env.get(n, "") != "":
            return int(env[n])
    return None


def resolve_launch_env(env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> LaunchEnv:
    """Rank / world size / local rank / rendezvous address of this process (see the module docstring).

    Raises ValueError naming the variables when they contradict each other or the rendezvous address is missing.
    """
    env = os.environ if env is None else env
    _, ds_local = strip_local_rank(sys.argv if argv is None else argv)
    addr = env.get("MASTER_ADDR") or None
    port = _int(env, "MASTER_PORT")
    if env.get("RANK", "") != "" and env.get("WORLD_SIZE", "") != "":
        local = _int(env, "LOCAL_RANK")
        if "TORCHELASTIC_RUN_ID" in env or "TORCHELASTIC_RESTART_COUNT" in env or "GROUP_RANK" in env:
            launcher = "torchrun"
        elif ds_local is not None or "CROSS_RANK" in env:
            launcher = "deepspeed"
        else:
            launcher = "env"
        if ds_local is not None:
            if local is not None and local != ds_local:
                raise ValueError(f"--local_rank={ds_local} disagrees with LOCAL_RANK={local}")
            local = ds_local
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), local or 0
    elif any(env.get(p + "RANK", "") != "" for p in ("OMPI_COMM_WORLD_", "MV2_COMM_WORLD_")) or env.get("PMI_RANK"):
        if env.get("OMPI_COMM_WORLD_RANK", "") != "":
            p, launcher = "OMPI_COMM_WORLD_", "openmpi"
            rank, world, local = int(env[p + "RANK"]), int(env[p + "SIZE"]), _int(env, p + "LOCAL_RANK") or 0
        elif env.get("MV2_COMM_WORLD_RANK", "") != "":
            p, launcher = "MV2_COMM_WORLD_", "mvapich"
            rank, world, local = int(env[p + "RANK"]), int(env[p + "SIZE"]), _int(env, p + "LOCAL_RANK") or 0
        else:
            launcher = "mpi"
            rank, world, local = int(env["PMI_RANK"]), int(env["PMI_SIZE"]), _int(env, "MPI_LOCALRANKID") or 0
        if addr is None and world > 1:
            raise ValueError(f"{launcher} launch: export MASTER_ADDR (and MASTER_PORT) to every rank "
                             "(mpirun -x MASTER_ADDR=... -x MASTER_PORT=...)")
        port = port if port is not None else 29500
    elif env.get("SLURM_PROCID", "") != "" and env.get("SLURM_NTASKS", "") != "":
        launcher = "slurm"
        rank, world, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), _int(env, "SLURM_LOCALID") or 0
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if addr is None and nodes:
            addr = first_host(nodes)
        if port is None and env.get("SLURM_JOB_ID"):
            port = 20000 + int(env["SLURM_JOB_ID"]) % 20000
    else:
        return LaunchEnv(0, 1, 0, addr, port, "none")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return LaunchEnv(rank, world, local, addr, port, launcher)


def export_launch_env(launch: LaunchEnv, env: MutableMapping[str, str] | None = None) -> None:
    """Write the resolved RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT into `env` (os.environ by
    default) where unset, so every library in the process reads the same launch (torch's env://, logging)."""
    env = os.environ if env is None else env
    if launch.launcher == "none":
        return
    env.setdefault("RANK", str(launch.rank))
    env.setdefault("WORLD_SIZE", str(launch.world_size))
    env["LOCAL_RANK"] = str(launch.local_rank)
    if launch.master_addr is not None:
        env.setdefault("MASTER_ADDR", launch.master_addr)
    if launch.master_port is not None:
        env.setdefault("MASTER_PORT", str(launch.master_port))
