"""1F1B (PipeDream-Flush, Narayanan et al. 2021) over torch.distributed P2P, with per-step length broadcast.

Why our own executor: torch.distributed.pipelining fixes inter-stage shapes at the first microbatch
(pytorch/torchtitan#431; on gloo a new length in step 2 fails with "Received data size doesn't match"), and
Megatron/DeepSpeed exchange a shape tensor before every send. Here the first stage knows every microbatch of
the step, so before the schedule starts it BROADCASTS, once, to its pipeline group:
    1. m, the number of microbatches;
    2. an (m, 5) table: padded length T_i, cu_seqlens entries, max_seqlen, supervised count, real length;
    3. one flat int64 payload with every microbatch's position_ids (3, T_i), cu_seqlens and labels (T_i),
       sized from the table.
Every stage then allocates its activation / gradient receive buffers by microbatch index with exactly that
microbatch's length (T_i, or T_i / tp under sequence parallelism). No padding to a common length, no
per-send shape exchange. Every wait has a timeout (the process-group timeout on NCCL via its watchdog).

The schedule of stage s of p with m microbatches: min(p - s - 1, m) warm-up forwards, then alternating one
forward / one backward, then the cool-down backwards. Paired sends and receives are issued together with
batch_isend_irecv (Megatron's send_forward_recv_backward / send_backward_recv_forward), which is
deadlock-free for this schedule.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from core.batch import PackedBatch


# ------------------------------------------------------------------------------------------ metadata
@dataclass
class MicrobatchMeta:
    """What every pipeline stage knows about microbatch i of the step (from the broadcast)."""

    num_tokens: int
    """Packed length T_i as the model sees it (after SP tail padding)."""
    num_real_tokens: int
    """Length before padding (for tokens/s)."""
    num_supervised: int
    """Positions with a label != -100."""
    max_seqlen: int
    position_ids: torch.Tensor
    """(3, T_i) int64."""
    cu_seqlens: torch.Tensor
    """(S_i + 1,) int32."""
    labels: torch.Tensor
    """(T_i,) int64."""


_TABLE_COLS = 5


def metas_from_batches(mbs: list[tuple[PackedBatch, int]]) -> list[MicrobatchMeta]:
    """Metadata of (possibly padded microbatch, real length) pairs, without communication."""
    out = []
    for mb, real in mbs:
        out.append(
            MicrobatchMeta(
                num_tokens=mb.num_tokens, num_real_tokens=real, num_supervised=mb.num_supervised,
                max_seqlen=int(mb.max_seqlen), position_ids=mb.position_ids.reshape(3, -1),
                cu_seqlens=mb.cu_seqlens.to(torch.int32), labels=mb.labels.reshape(-1),
            )
        )
    return out


def broadcast_step_metadata(
    mbs: list[tuple[PackedBatch, int]] | None,
    *,
    src: int,
    group: dist.ProcessGroup,
    device: torch.device,
) -> list[MicrobatchMeta]:
    """Stage 0 (global rank `src`) sends the step's lengths and small per-microbatch tensors to its group."""
    is_src = dist.get_rank() == src
    if is_src:
        if not mbs:
            raise ValueError("pipeline stage 0 needs the step's microbatches (got none)")
        metas = metas_from_batches(mbs)
        m_1 = torch.tensor([len(metas)], dtype=torch.long, device=device)
    else:
        m_1 = torch.zeros(1, dtype=torch.long, device=device)
    dist.broadcast(m_1, src=src, group=group)
    m = int(m_1.item())
    if is_src:
        table_m5 = torch.tensor(
            [[x.num_tokens, x.cu_seqlens.numel(), x.max_seqlen, x.num_supervised, x.num_real_tokens] for x in metas],
            dtype=torch.long, device=device,
        )
    else:
        table_m5 = torch.zeros(m, _TABLE_COLS, dtype=torch.long, device=device)
    dist.broadcast(table_m5, src=src, group=group)
    rows = table_m5.tolist()
    total = sum(4 * T + n_cu for T, n_cu, *_ in rows)
    if is_src:
        payload = torch.cat(
            [torch.cat([x.position_ids.reshape(-1).long(), x.cu_seqlens.long(), x.labels.long()]) for x in metas]
        ).to(device)
    else:
        payload = torch.empty(total, dtype=torch.long, device=device)
    dist.broadcast(payload, src=src, group=group)
    if is_src:
        return metas
    out, off = [], 0
    for T, n_cu, max_seqlen, n_sup, real in rows:
        pos = payload[off : off + 3 * T].view(3, T)
        off += 3 * T
        cu = payload[off : off + n_cu].to(torch.int32)
        off += n_cu
        labels = payload[off : off + T]
        off += T
        out.append(MicrobatchMeta(T, real, n_sup, max_seqlen, pos, cu, labels))
    return out


# ------------------------------------------------------------------------------------------ executor
@dataclass
class ScheduleStats:
    """Per-step record of one stage's schedule (for tests and the bubble benchmark)."""

    recv_shapes: list[tuple[str, int, tuple[int, ...]]] = field(default_factory=list)
    """(direction 'fwd'|'bwd', microbatch index, buffer shape) of every receive buffer allocated."""
    compute_s: float = 0.0
    """Seconds spent in forward/backward compute (CPU timing; excludes waiting for peers)."""
    wall_s: float = 0.0
    """Seconds from the first to the last schedule action."""
    order: list[tuple[str, int]] = field(default_factory=list)
    """('F'|'B', microbatch) in execution order."""
    start_time: float = 0.0
    """time.time() when the schedule started (to line stages up on one host: the bubble benchmark)."""
    end_time: float = 0.0
    """time.time() when this stage's schedule ended."""

    @property
    def idle_fraction(self) -> float:
        """This stage's idle share of its OWN schedule span. The pipeline bubble proper is measured against the
        whole pipeline's span (first stage start to last stage end), see benchmarks/bench_pipeline.py."""
        return 1.0 - self.compute_s / self.wall_s if self.wall_s > 0 else 0.0


class OneFOneB:
    """The 1F1B schedule of one pipeline stage over P2P ops in `group`.

    forward_fn(i, x) -> y: runs microbatch i (x = received activation, None on stage 0); returns the tensor
        to send (or, on the last stage, the scalar to backpropagate).
    before_backward(i): called before microbatch i's backward (FSDP sync flags).
    act_shape(i) -> shape of microbatch i's inter-stage activation (and of its gradient).
    """

    def __init__(
        self,
        *,
        stage: int,
        num_stages: int,
        group: dist.ProcessGroup | None,
        prev_rank: int | None,
        next_rank: int | None,
        timeout: datetime.timedelta,
        device: torch.device,
    ) -> None:
        self.stage, self.num_stages = stage, num_stages
        self.group, self.prev_rank, self.next_rank = group, prev_rank, next_rank
        self.timeout, self.device = timeout, device
        self.first, self.last = stage == 0, stage == num_stages - 1
        # NCCL work.wait(timeout) would block the CPU on every P2P; its watchdog enforces the timeout instead.
        self._wait_timeout = group is not None and dist.get_backend(group) == "gloo"

    # ---------------------------------------------------------------- p2p
    def _exchange(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]]) -> None:
        ops = [dist.P2POp(dist.isend, t, peer, self.group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer, self.group) for t, peer in recvs]
        if not ops:
            return
        for work in dist.batch_isend_irecv(ops):
            if self._wait_timeout:
                work.wait(self.timeout)
            else:
                work.wait()

    def run(
        self,
        num_microbatches: int,
        forward_fn: Callable[[int, torch.Tensor | None], torch.Tensor],
        before_backward: Callable[[int], None],
        act_shape: Callable[[int], tuple[int, ...]],
        dtype: torch.dtype,
    ) -> ScheduleStats:
        m, p, s = num_microbatches, self.num_stages, self.stage
        stats = ScheduleStats()
        inputs: dict[int, torch.Tensor | None] = {}
        outputs: dict[int, torch.Tensor] = {}

        def buf(direction: str, i: int) -> torch.Tensor:
            shape = tuple(act_shape(i))
            stats.recv_shapes.append((direction, i, shape))
            return torch.empty(shape, dtype=dtype, device=self.device)

        def forward(i: int, x: torch.Tensor | None) -> None:
            if x is not None:
                x.requires_grad_(True)
            t0 = time.perf_counter()
            y = forward_fn(i, x)
            stats.compute_s += time.perf_counter() - t0
            stats.order.append(("F", i))
            inputs[i], outputs[i] = x, y

        def backward(i: int, grad: torch.Tensor | None) -> torch.Tensor | None:
            x, y = inputs.pop(i), outputs.pop(i)
            before_backward(i)
            t0 = time.perf_counter()
            if y.requires_grad:
                torch.autograd.backward(y, grad)
            stats.compute_s += time.perf_counter() - t0
            stats.order.append(("B", i))
            if x is None:
                return None
            # A stage whose inputs reach no trainable parameter still sends a (zero) gradient: the
            # schedule's sends and receives never depend on what is frozen.
            return x.grad if x.grad is not None else torch.zeros_like(x)

        def recv_forward(i: int) -> torch.Tensor | None:
            if self.first:
                return None
            x = buf("fwd", i)
            self._exchange([], [(x, self.prev_rank)])
            return x

        def send_forward(i: int) -> None:
            if not self.last:
                self._exchange([(outputs[i].detach(), self.next_rank)], [])

        def send_forward_recv_backward(i_f: int, i_b: int) -> torch.Tensor | None:
            if self.last:
                return None
            g = buf("bwd", i_b)
            self._exchange([(outputs[i_f].detach(), self.next_rank)], [(g, self.next_rank)])
            return g

        def send_backward_recv_forward(i_b: int, dx: torch.Tensor | None, i_f: int) -> torch.Tensor | None:
            if self.first:
                return None
            x = buf("fwd", i_f)
            self._exchange([(dx, self.prev_rank)], [(x, self.prev_rank)])
            return x

        def send_backward(dx: torch.Tensor | None) -> None:
            if not self.first:
                self._exchange([(dx, self.prev_rank)], [])

        def recv_backward(i: int) -> torch.Tensor | None:
            if self.last:
                return None
            g = buf("bwd", i)
            self._exchange([], [(g, self.next_rank)])
            return g

        stats.start_time = time.time()
        t_start = time.perf_counter()
        warmup = min(p - s - 1, m)
        remaining = m - warmup
        for i in range(warmup):
            forward(i, recv_forward(i))
            send_forward(i)
        x = recv_forward(warmup) if remaining > 0 else None
        for j in range(remaining):
            i_f = warmup + j
            forward(i_f, x)
            g = send_forward_recv_backward(i_f, j)
            dx = backward(j, g)
            if j == remaining - 1:
                send_backward(dx)
            else:
                x = send_backward_recv_forward(j, dx, i_f + 1)
        for i in range(remaining, m):
            dx = backward(i, recv_backward(i))
            send_backward(dx)
        stats.wall_s = time.perf_counter() - t_start
        stats.end_time = time.time()
        return stats
