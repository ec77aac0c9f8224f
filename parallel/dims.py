"""ParallelDims, named DeviceMesh (pp, dp, tp) and process-group setup from the launcher's environment.

The launcher (torchrun, deepspeed, MPI, srun, or none: a single process with an in-memory store) is read by
parallel/launcher.py.

NOTE: every process group (the default one and each mesh dimension's) gets `timeout_s`; DeviceMesh would
otherwise create its sub-groups with torch's 30-minute default, and a hang in a tp collective would sit there.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.config import ParallelConfig
from parallel.launcher import resolve_launch_env

MESH_DIMS = ("pp", "dp", "tp")


# ------------------------------------------------------------------------------------------ ParallelDims
@dataclass
class ParallelDims:
    """The layout pp x dp x tp over `world_size` ranks, and (after `build_mesh`) its named DeviceMesh.

    Rank order is (pp, dp, tp) row-major: tp ranks are adjacent (fast intra-node links), pp outermost.
    """

    pp: int
    dp: int
    tp: int
    world_size: int
    mesh: DeviceMesh | None = field(default=None, repr=False)
    timeout: datetime.timedelta = field(default=datetime.timedelta(seconds=600), repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"), repr=False)
    host_group: dist.ProcessGroup | None = field(default=None, repr=False)
    """A world group on the CPU (gloo) for the step's exchange of host values (ParallelModel.step), so it never
    waits for the device; None: the default group, which is gloo already (CPU runs)."""

    def __post_init__(self) -> None:
        for name in ("pp", "tp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.dp == -1:
            if self.world_size % (self.pp * self.tp):
                raise ValueError(
                    f"world size {self.world_size} is not divisible by pp*tp = {self.pp}*{self.tp}; "
                    f"choose pp and tp whose product divides {self.world_size}, or launch "
                    f"a multiple of {self.pp * self.tp} processes"
                )
            self.dp = self.world_size // (self.pp * self.tp)
        if self.dp < 1:
            raise ValueError(f"dp={self.dp} must be >= 1 (or -1 to fill from the world size)")
        if self.pp * self.dp * self.tp != self.world_size:
            raise ValueError(
                f"pp*dp*tp = {self.pp}*{self.dp}*{self.tp} = {self.pp * self.dp * self.tp} != world size "
                f"{self.world_size}; set dp=-1 to fill it from the world size, or change pp/dp/tp so that "
                f"their product is {self.world_size}"
            )

    # ---------------------------------------------------------------- mesh
    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Create the (pp, dp, tp) DeviceMesh with every sub-group carrying `self.timeout`."""
        shape = (self.pp, self.dp, self.tp)
        if "backend_override" in inspect.signature(init_device_mesh).parameters:
            backend = "nccl" if device_type == "cuda" else "gloo"

            def options():
                # One Options object per dimension: c10d writes the group's ranks and name into it.
                opts = dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options()
                opts._timeout = self.timeout
                return opts

            override = {name: (backend, options()) for name in MESH_DIMS}
            self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS, backend_override=override)
        else:  # pragma: no cover - torch without backend_override: sub-groups take the default timeout.
            import torch.distributed.distributed_c10d as c10d

            saved = c10d.default_pg_timeout
            c10d.default_pg_timeout = self.timeout
            try:
                self.mesh = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
            finally:
                c10d.default_pg_timeout = saved
        return self.mesh

    def get_mesh(self, *names: str) -> DeviceMesh:
        """A named sub-mesh: get_mesh('tp'), get_mesh('dp'), get_mesh('dp', 'tp'), ..."""
        bad = [n for n in names if n not in MESH_DIMS]
        if bad or not names:
            raise ValueError(f"unknown mesh dimension(s) {bad or names}; valid names are {MESH_DIMS}")
        if self.mesh is None:
            raise ValueError("ParallelDims has no mesh yet; call init_distributed(cfg) (or build_mesh) first")
        return self.mesh[names[0]] if len(names) == 1 else self.mesh[tuple(names)]

    def get_group(self, name: str) -> dist.ProcessGroup:
        """The process group of this rank along one mesh dimension."""
        return self.get_mesh(name).get_group()

    def _coord(self, name: str) -> int:
        return self.get_mesh(name).get_local_rank()

    @property
    def pp_rank(self) -> int:
        return self._coord("pp")

    @property
    def dp_rank(self) -> int:
        return self._coord("dp")

    @property
    def tp_rank(self) -> int:
        return self._coord("tp")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    def stage_rank(self, stage: int) -> int:
        """Global rank of pipeline stage `stage` that shares this rank's (dp, tp) coordinate."""
        return dist.get_process_group_ranks(self.get_group("pp"))[stage]


# ------------------------------------------------------------------------------------------ init
_DIMS: ParallelDims | None = None


def _pick_device(cfg: ParallelConfig, local_rank: int) -> torch.device:
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("parallel.device='cuda' but CUDA is not available; use device='auto' or 'cpu'")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(cfg: ParallelConfig, env: Mapping[str, str] | None = None) -> ParallelDims:
    """Initialize torch.distributed from the launcher's environment and build the (pp, dp, tp) mesh.

    Idempotent: a second call with the same layout returns the same ParallelDims; a different layout is an
    error (one mesh per process). A process group that the caller initialized already (e.g. by
    deepspeed.init_distributed) is reused as is. World size 1 works without any launcher (in-memory store).
    """
    global _DIMS
    cfg.validate()
    launch = resolve_launch_env(env)
    if _DIMS is not None and dist.is_initialized():
        want = ParallelDims(cfg.pp, cfg.dp, cfg.tp, dist.get_world_size())
        if (want.pp, want.dp, want.tp) != (_DIMS.pp, _DIMS.dp, _DIMS.tp):
            raise ValueError(
                f"init_distributed was already called with pp={_DIMS.pp} dp={_DIMS.dp} tp={_DIMS.tp}; "
                f"a process has one mesh, so pp={want.pp} dp={want.dp} tp={want.tp} needs a new process"
            )
        return _DIMS
    device = _pick_device(cfg, launch.local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("parallel.backend='nccl' needs CUDA; use backend='auto' or 'gloo' on CPU")
    timeout = datetime.timedelta(seconds=float(cfg.timeout_s))
    # Validate the layout before touching the network, so a wrong layout fails fast on every rank.
    world = dist.get_world_size() if dist.is_initialized() else launch.world_size
    dims = ParallelDims(cfg.pp, cfg.dp, cfg.tp, world, timeout=timeout, device=device)
    if not dist.is_initialized():
        if launch.world_size == 1 and launch.master_addr is None:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            if launch.master_addr is None or launch.master_port is None:
                raise ValueError(
                    f"world size {launch.world_size} (from the {launch.launcher} launcher) needs MASTER_ADDR and "
                    "MASTER_PORT in the environment (torchrun and deepspeed set them; export them for mpirun/srun)"
                )
            environ = os.environ if env is None else env
            restart = environ.get("TORCHELASTIC_RESTART_COUNT")
            if restart is None:
                dist.init_process_group(
                    backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
                    rank=launch.rank, world_size=launch.world_size, timeout=timeout,
                )
            else:
                # NOTE: torchrun (torch 2.13, --standalone and c10d rendezvous) hands every attempt of a restarted
                # job the SAME agent TCPStore, with the failed attempt's keys still in it; gloo's connection
                # rendezvous of the new attempt can then read a dead rank's address ("Connection refused" in
                # connectFullMesh) and a restarted job fails at random. A store namespaced by the attempt number
                # gives every attempt a clean rendezvous.
                agent_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                store = dist.TCPStore(launch.master_addr, int(launch.master_port), launch.world_size,
                                      is_master=not agent_store and launch.rank == 0, timeout=timeout)
                # Multi-node runs turn the agent-store sharing off (launch/torchrun.sh: a replacement node cannot join
                # a shared store, pytorch/pytorch#135712); each rendezvous round then has a fresh store of its own,
                # whose keys the surviving and the replacement nodes must name alike: no attempt prefix there.
                if agent_store:
                    store = dist.PrefixStore(f"qwen2vl/attempt_{restart}", store)
                dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size,
                                        timeout=timeout)
    dims.build_mesh(device.type)
    if dist.get_backend() != "gloo":
        dims.host_group = dist.new_group(backend="gloo", timeout=timeout)
    _DIMS = dims
    return dims


def destroy_distributed() -> None:
    """Tear down the process groups created by init_distributed (tests, end of training)."""
    global _DIMS
    _DIMS = None
    if dist.is_initialized():
        dist.destroy_process_group()
