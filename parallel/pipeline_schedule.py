"""Pipeline schedules (1F1B, interleaved 1F1B) as per-rank programs, the executor that runs them over
torch.distributed P2P, and the per-step length broadcast.

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

Schedules (Narayanan et al. 2021), p ranks, m microbatches:
    '1f1b'              PipeDream-Flush: rank s runs min(p - s - 1, m) warm-up forwards, then one forward / one
                        backward, then the cool-down backwards. Idle share of the step (p-1)/(m+p-1).
    'interleaved_1f1b'  every rank holds v model chunks: the model is cut into p*v virtual stages and rank r runs
                        virtual stages r, r+p, ..., r+(v-1)p (chunk c = virtual stage c*p + r). Forwards go
                        through the chunks in groups of p microbatches (chunk 0 of microbatches 0..p-1, chunk 1
                        of the same, ..., then the next group), with 2(p-r-1) + (v-1)p warm-up forwards
                        (Megatron's forward_backward_pipelining_with_interleaving). Idle share (p-1)/(v*m+p-1),
                        for v times the inter-stage messages. Needs m to be a multiple of p: with other counts
                        this lockstep pairing stalls or deadlocks (the tests' simulator shows it), so they are
                        an error.

A program is data: compute items (F or B of (chunk, microbatch)) and exchanges (sends and receives issued
together with batch_isend_irecv and all waited for before the next item, Megatron's pairing: a rank's send to
its neighbour goes out with its receive for the next compute). Within one exchange activations come before
gradients on both sides, so with p = 2 (both neighbours are the same rank) the per-pair message order still
matches. tests/parallel/schedule_sim.py runs the programs of all ranks in a rendezvous model (an exchange
completes only once every peer has posted the matching op; stricter than gloo's or NCCL's, so a program that
passes cannot hang there) and raises on a mismatched message or a deadlock; tests/parallel/test_schedule.py runs
it on a grid of (p, v, m) and checks the simulated idle share against the formulas above.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from core.batch import IGNORE_INDEX, PackedBatch

Schedule = Literal["1f1b", "interleaved_1f1b"]


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
    supervised_idx: torch.Tensor | None = None
    """(num_supervised,) int64: the positions with a label, found on the host (parallel/engine.py prepare); None:
    the loss finds them on the device."""


_TABLE_COLS = 5


def metas_from_batches(mbs: list[tuple[PackedBatch, int, int]]) -> list[MicrobatchMeta]:
    """Metadata of (possibly padded microbatch, real length, supervised count) triples, without communication."""
    out = []
    for mb, real, n_sup in mbs:
        out.append(
            MicrobatchMeta(
                num_tokens=mb.num_tokens, num_real_tokens=real, num_supervised=n_sup,
                max_seqlen=int(mb.max_seqlen), position_ids=mb.position_ids.reshape(3, -1),
                cu_seqlens=mb.cu_seqlens.to(torch.int32), labels=mb.labels.reshape(-1),
                supervised_idx=mb.supervised_idx,
            )
        )
    return out


def _supervised(meta: MicrobatchMeta) -> torch.Tensor:
    if meta.supervised_idx is not None:
        return meta.supervised_idx.long()
    return torch.nonzero(meta.labels != IGNORE_INDEX).flatten()


def broadcast_step_metadata(
    mbs: list[tuple[PackedBatch, int, int]] | None,
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
    total = sum(4 * T + n_cu + n_sup for T, n_cu, _, n_sup, _ in rows)
    if is_src:
        payload = torch.cat(
            [torch.cat([x.position_ids.reshape(-1).long(), x.cu_seqlens.long(), x.labels.long(), _supervised(x)])
             for x in metas]
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
        sup = payload[off : off + n_sup]
        off += n_sup
        out.append(MicrobatchMeta(T, real, n_sup, max_seqlen, pos, cu, labels, sup))
    return out


# ------------------------------------------------------------------------------------------ programs
@dataclass(frozen=True)
class Msg:
    """One inter-stage message: the activation a virtual stage sends forward, or the input gradient it sends
    back, for one microbatch. Named by the SENDER's virtual stage (the receiver names it the same way)."""

    kind: Literal["act", "grad"]
    mb: int
    vstage: int


@dataclass(frozen=True)
class Compute:
    kind: Literal["F", "B"]
    chunk: int
    mb: int


@dataclass(frozen=True)
class Exchange:
    sends: tuple[Msg, ...]
    recvs: tuple[Msg, ...]


Program = list[Compute | Exchange]


class _Builder:
    """Appends the items of rank r's program; knows which messages a chunk's forward/backward needs and sends."""

    def __init__(self, p: int, v: int, r: int) -> None:
        self.p, self.v, self.r = p, v, r
        self.last = p * v - 1
        self.items: Program = []

    def vs(self, a: Compute) -> int:
        return a.chunk * self.p + self.r

    def recv_in(self, a: Compute) -> Msg | None:
        return Msg("act", a.mb, self.vs(a) - 1) if self.vs(a) > 0 else None

    def send_out(self, a: Compute) -> Msg | None:
        return Msg("act", a.mb, self.vs(a)) if self.vs(a) < self.last else None

    def recv_grad(self, a: Compute) -> Msg | None:
        return Msg("grad", a.mb, self.vs(a) + 1) if self.vs(a) < self.last else None

    def send_grad(self, a: Compute) -> Msg | None:
        return Msg("grad", a.mb, self.vs(a)) if self.vs(a) > 0 else None

    def compute(self, *actions: Compute) -> None:
        self.items.extend(actions)

    def exchange(self, sends: list[Msg | None], recvs: list[Msg | None]) -> None:
        # Activations before gradients on both sides: see the module docstring (p = 2).
        key = {"act": 0, "grad": 1}
        s = tuple(sorted((m for m in sends if m is not None), key=lambda m: key[m.kind]))
        r = tuple(sorted((m for m in recvs if m is not None), key=lambda m: key[m.kind]))
        if s or r:
            self.items.append(Exchange(s, r))


def one_f_one_b_program(p: int, r: int, m: int, forward_only: bool) -> Program:
    """Rank r's 1F1B program (one chunk): Megatron's non-interleaved schedule and communication pairing."""
    b = _Builder(p, 1, r)
    F = [Compute("F", 0, i) for i in range(m)]
    B = [Compute("B", 0, i) for i in range(m)]
    if forward_only:
        for f in F:
            b.exchange([], [b.recv_in(f)])
            b.compute(f)
            b.exchange([b.send_out(f)], [])
        return b.items
    warmup = min(p - r - 1, m)
    remaining = m - warmup
    for f in F[:warmup]:
        b.exchange([], [b.recv_in(f)])
        b.compute(f)
        b.exchange([b.send_out(f)], [])
    if remaining:
        b.exchange([], [b.recv_in(F[warmup])])
    for j in range(remaining):
        f = F[warmup + j]
        b.compute(f)
        b.exchange([b.send_out(f)], [b.recv_grad(B[j])])
        b.compute(B[j])
        nxt = [b.recv_in(F[warmup + j + 1])] if j < remaining - 1 else []
        b.exchange([b.send_grad(B[j])], nxt)
    for bw in B[remaining:]:
        b.exchange([], [b.recv_grad(bw)])
        b.compute(bw)
        b.exchange([b.send_grad(bw)], [])
    return b.items


def check_interleaved_microbatches(m: int, p: int) -> None:
    """The interleaved schedule needs m to be a multiple of p (Narayanan et al. 2021; Megatron's rule)."""
    if m < 1 or m % p:
        use = " or ".join(str(x) for x in (m - m % p, m - m % p + p) if x >= p)
        raise ValueError(
            f"pp_schedule='interleaved_1f1b' needs the microbatches per step to be a multiple of pp={p}, got {m}; "
            f"use {use}, or pp_schedule='1f1b'"
        )


def interleaved_table(m: int, v: int, p: int) -> list[tuple[int, int]]:
    """(chunk, microbatch) of every forward in order: groups of p microbatches, each through chunk 0, then chunk
    1, ..., then chunk v-1. Backward k runs chunk v-1-c of entry k = (c, i)."""
    return [(c, i) for start in range(0, m, p) for c in range(v) for i in range(start, start + p)]


def interleaved_program(p: int, v: int, r: int, m: int, forward_only: bool) -> Program:
    """Rank r's interleaved 1F1B program (Megatron's forward_backward_pipelining_with_interleaving)."""
    check_interleaved_microbatches(m, p)
    table = interleaved_table(m, v, p)
    F = [Compute("F", c, i) for c, i in table]
    B = [Compute("B", v - 1 - c, i) for c, i in table]
    n = len(table)
    warmup = n if forward_only else min(n, 2 * (p - r - 1) + (v - 1) * p)
    remaining = n - warmup
    b = _Builder(p, v, r)
    b.exchange([], [b.recv_in(F[0])])
    for k in range(warmup):
        b.compute(F[k])
        recvs = [b.recv_in(F[k + 1])] if k + 1 < n else []
        if k == warmup - 1 and remaining:
            recvs.append(b.recv_grad(B[0]))  # the first steady-state iteration runs B[0] right after a forward
        b.exchange([b.send_out(F[k])], recvs)
    if forward_only:
        return b.items
    if not remaining:
        b.exchange([], [b.recv_grad(B[0])])
    for j in range(remaining):
        f = F[warmup + j]
        b.compute(f, B[j])
        recvs = [b.recv_in(F[warmup + j + 1])] if warmup + j + 1 < n else []
        recvs.append(b.recv_grad(B[j + 1]))
        b.exchange([b.send_out(f), b.send_grad(B[j])], recvs)
    for k in range(remaining, n):
        b.compute(B[k])
        b.exchange([b.send_grad(B[k])], [b.recv_grad(B[k + 1])] if k + 1 < n else [])
    return b.items


def build_program(schedule: Schedule, p: int, v: int, r: int, m: int, forward_only: bool = False) -> Program:
    if schedule == "1f1b":
        if v != 1:
            raise ValueError(f"pp_schedule='1f1b' runs one chunk per rank, got {v} virtual stages")
        return one_f_one_b_program(p, r, m, forward_only)
    if schedule == "interleaved_1f1b":
        return interleaved_program(p, v, r, m, forward_only)
    raise ValueError(f"unknown pipeline schedule {schedule!r}; choose '1f1b' or 'interleaved_1f1b'")


# ------------------------------------------------------------------------------------------ executor
@dataclass
class ScheduleStats:
    """Per-step record of one rank's schedule (for tests and the pipeline benchmark)."""

    recv_shapes: list[tuple[str, int, int, tuple[int, ...]]] = field(default_factory=list)
    """(direction 'fwd'|'bwd', chunk, microbatch, buffer shape) of every receive buffer allocated."""
    compute_s: float = 0.0
    """Seconds spent in forward/backward compute (CPU timing; excludes waiting for peers)."""
    wall_s: float = 0.0
    """Seconds from the first to the last schedule action."""
    order: list[tuple[str, int, int]] = field(default_factory=list)
    """('F'|'B', chunk, microbatch) in execution order."""
    sent_bytes: int = 0
    """Bytes this rank sent to other pipeline ranks (activations and gradients; not the metadata broadcast)."""
    messages: int = 0
    """P2P sends this rank issued."""
    start_time: float = 0.0
    """time.time() when the schedule started (to line stages up on one host: the pipeline benchmark)."""
    end_time: float = 0.0
    """time.time() when this rank's schedule ended. The pipeline bubble is measured against the whole pipeline's
    span (first stage start to last stage end): benchmarks/bench_pipeline.py."""


class PipelineExecutor:
    """Runs this rank's program of `schedule` over P2P ops in `group`.

    forward_fn(chunk, i, x) -> y: runs microbatch i through model chunk `chunk` (x = received activation, None
        on virtual stage 0); returns the tensor to send (or, on the last virtual stage, the scalar to
        backpropagate).
    before_backward(chunk, i): called before that chunk's backward of microbatch i (FSDP sync flags).
    act_shape(i) -> shape of microbatch i's inter-stage activation (and of its gradient).
    """

    def __init__(
        self,
        *,
        schedule: Schedule,
        stage: int,
        num_stages: int,
        num_chunks: int,
        group: dist.ProcessGroup | None,
        stage_ranks: list[int],
        timeout: datetime.timedelta,
        device: torch.device,
    ) -> None:
        self.schedule, self.stage, self.num_stages, self.num_chunks = schedule, stage, num_stages, num_chunks
        self.group, self.stage_ranks = group, stage_ranks
        self.timeout, self.device = timeout, device
        # NCCL work.wait(timeout) would block the CPU on every P2P; its watchdog enforces the timeout instead.
        self._wait_timeout = group is not None and dist.get_backend(group) == "gloo"

    def check_microbatches(self, m: int) -> None:
        """Raise ValueError (on every rank alike) when the schedule cannot run m microbatches."""
        if self.schedule == "interleaved_1f1b":
            check_interleaved_microbatches(m, self.num_stages)

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
        forward_fn: Callable[[int, int, torch.Tensor | None], torch.Tensor],
        before_backward: Callable[[int, int], None],
        act_shape: Callable[[int], tuple[int, ...]],
        dtype: torch.dtype,
        forward_only: bool = False,
    ) -> ScheduleStats:
        p, s = self.num_stages, self.stage
        program = build_program(self.schedule, p, self.num_chunks, s, num_microbatches, forward_only)
        stats = ScheduleStats()
        inputs: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, mb) -> received activation
        grads: dict[tuple[int, int], torch.Tensor] = {}  # (chunk, mb) -> received output gradient
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        input_grads: dict[tuple[int, int], torch.Tensor] = {}

        def chunk_of(vs: int) -> int:
            return vs // p

        def forward(c: int, i: int) -> None:
            x = inputs.pop((c, i), None) if forward_only else inputs.get((c, i))
            if x is not None and not forward_only:
                x.requires_grad_(True)
            t0 = time.perf_counter()
            y = forward_fn(c, i, x)
            stats.compute_s += time.perf_counter() - t0
            stats.order.append(("F", c, i))
            if not (forward_only and c * p + s == p * self.num_chunks - 1):
                outputs[(c, i)] = y  # (forward-only: the last virtual stage's loss is not kept)

        def backward(c: int, i: int) -> None:
            x, y, g = inputs.pop((c, i), None), outputs.pop((c, i)), grads.pop((c, i), None)
            before_backward(c, i)
            t0 = time.perf_counter()
            if y.requires_grad:
                torch.autograd.backward(y, g)
            stats.compute_s += time.perf_counter() - t0
            stats.order.append(("B", c, i))
            if x is not None:
                # A stage whose inputs reach no trainable parameter still sends a (zero) gradient: the
                # schedule's sends and receives never depend on what is frozen.
                input_grads[(c, i)] = x.grad if x.grad is not None else torch.zeros_like(x)

        def exchange(item: Exchange) -> None:
            sends, recvs = [], []
            for msg in item.sends:
                if msg.kind == "act":
                    key, peer = (chunk_of(msg.vstage), msg.mb), (msg.vstage + 1) % p
                    t = (outputs.pop(key) if forward_only else outputs[key]).detach()
                else:
                    key, peer = (chunk_of(msg.vstage), msg.mb), (msg.vstage - 1) % p
                    t = input_grads.pop(key)
                sends.append((t, self.stage_ranks[peer]))
                stats.sent_bytes += t.numel() * t.element_size()
                stats.messages += 1
            for msg in item.recvs:
                shape = tuple(act_shape(msg.mb))
                buf = torch.empty(shape, dtype=dtype, device=self.device)
                if msg.kind == "act":
                    stats.recv_shapes.append(("fwd", chunk_of(msg.vstage + 1), msg.mb, shape))
                    inputs[(chunk_of(msg.vstage + 1), msg.mb)] = buf
                else:
                    stats.recv_shapes.append(("bwd", chunk_of(msg.vstage - 1), msg.mb, shape))
                    grads[(chunk_of(msg.vstage - 1), msg.mb)] = buf
                recvs.append((buf, self.stage_ranks[msg.vstage % p]))
            self._exchange(sends, recvs)

        stats.start_time = time.time()
        t_start = time.perf_counter()
        for item in program:
            if isinstance(item, Exchange):
                exchange(item)
            elif item.kind == "F":
                forward(item.chunk, item.mb)
            else:
                backward(item.chunk, item.mb)
        stats.wall_s = time.perf_counter() - t_start
        stats.end_time = time.time()
        return stats
