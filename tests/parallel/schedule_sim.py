"""A simulator of the pipeline programs (parallel/pipeline_schedule.py) for the schedule tests: every rank's
program runs in a rendezvous model (an exchange completes only once every peer has posted the matching op;
stricter than gloo's or NCCL's, so a program that passes cannot hang there), and a mismatched message or a
deadlock raises. tests/parallel/test_schedule.py runs it on a grid of (p, v, m) and checks the simulated idle
share against the formulas of Narayanan et al. 2021.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.pipeline_schedule import Compute, Msg, Program


@dataclass
class SimResult:
    """simulate(): when every rank finished, and how long each computed."""

    makespan: float
    busy: list[float]
    messages: list[int]
    """Messages sent per rank."""

    @property
    def idle_fraction(self) -> float:
        """Mean idle share of the makespan over the ranks (the pipeline bubble)."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan)


def simulate(programs: list[Program], v: int, cost_f: float = 1.0, cost_b: float = 2.0,
             forward_only: bool = False) -> SimResult:
    """Run every rank's program in a rendezvous model (compute items take cost_f / cost_b divided by v, one
    chunk being 1/v of a rank's layers; an exchange completes when every peer posted the matching op).

    Raises RuntimeError when a compute item lacks its input, a message is matched with a different one, an
    F/B is missing or repeated, or the ranks deadlock."""
    p = len(programs)
    last = p * v - 1
    pc, clock, busy, sent = [0] * p, [0.0] * p, [0.0] * p, [0] * p
    posted: list[list[tuple[str, int, int]] | None] = [None] * p  # this rank's ops of its current exchange
    sends: dict[tuple[int, int], list[tuple[Msg, float]]] = {}
    recvs: dict[tuple[int, int], list[tuple[Msg, float]]] = {}
    have: list[set] = [set() for _ in range(p)]
    done: list[set] = [set() for _ in range(p)]

    def peer(r: int, msg: Msg, sending: bool) -> int:
        if sending:
            return (msg.vstage + (1 if msg.kind == "act" else -1)) % p
        return msg.vstage % p

    def step(r: int) -> bool:
        item = programs[r][pc[r]]
        if isinstance(item, Compute):
            vs = item.chunk * p + r
            key = (item.kind, item.chunk, item.mb)
            if key in done[r]:
                raise RuntimeError(f"rank {r} runs {key} twice")
            if item.kind == "F" and vs > 0 and ("act", item.mb, vs - 1) not in have[r]:
                raise RuntimeError(f"rank {r} runs {key} before receiving its input")
            if item.kind == "B":
                if ("F", item.chunk, item.mb) not in done[r]:
                    raise RuntimeError(f"rank {r} runs {key} before its forward")
                if vs < last and ("grad", item.mb, vs + 1) not in have[r]:
                    raise RuntimeError(f"rank {r} runs {key} before receiving its gradient")
            done[r].add(key)
            cost = (cost_f if item.kind == "F" else cost_b) / v
            clock[r] += cost
            busy[r] += cost
            pc[r] += 1
            return True
        if posted[r] is None:
            ops = []
            for msg in item.sends:
                q = sends.setdefault((r, peer(r, msg, True)), [])
                ops.append(("send", peer(r, msg, True), len(q)))
                q.append((msg, clock[r]))
                sent[r] += 1
            for msg in item.recvs:
                q = recvs.setdefault((peer(r, msg, False), r), [])
                ops.append(("recv", peer(r, msg, False), len(q)))
                q.append((msg, clock[r]))
            posted[r] = ops
        t = clock[r]
        for kind, other, k in posted[r]:
            mine, theirs = (sends[(r, other)], recvs.get((r, other), [])) if kind == "send" else (
                recvs[(other, r)], sends.get((other, r), []))
            if len(theirs) <= k:
                return False
            if theirs[k][0] != mine[k][0]:
                raise RuntimeError(f"rank {r} {kind} #{k} with rank {other}: {mine[k][0]} matched {theirs[k][0]}")
            t = max(t, theirs[k][1])
        for msg in item.recvs:
            have[r].add((msg.kind, msg.mb, msg.vstage))
        clock[r] = t
        posted[r] = None
        pc[r] += 1
        return True

    while any(pc[r] < len(programs[r]) for r in range(p)):
        progressed = False
        for r in range(p):
            while pc[r] < len(programs[r]) and step(r):
                progressed = True
        if not progressed:
            stuck = {r: programs[r][pc[r]] for r in range(p) if pc[r] < len(programs[r])}
            raise RuntimeError(f"pipeline programs deadlock: {stuck}")
    kinds = ("F",) if forward_only else ("F", "B")
    n_mb = 1 + max((a.mb for prog in programs for a in prog if isinstance(a, Compute)), default=-1)
    for r in range(p):
        want = {(k, c, i) for k in kinds for c in range(v) for i in range(n_mb)}
        if done[r] != want:
            raise RuntimeError(f"rank {r} computed {sorted(done[r] ^ want)[:6]} wrongly (missing or extra)")
    return SimResult(makespan=max(clock), busy=busy, messages=sent)
