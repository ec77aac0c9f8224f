"""python benchmarks/bench_pipeline.py --stages 2 --microbatches 2 4 8 --schedules 1f1b interleaved_1f1b [--json]

1F1B and interleaved 1F1B side by side on CPU (gloo): per step and schedule, the pipeline bubble (idle share)
next to theory, the bytes and messages each rank sends, and the step time. With p stages, v virtual stages
per rank and m equal microbatches, theory is (p-1)/(m+p-1) for 1F1B and (p-1)/(v*m+p-1) interleaved
(Narayanan et al. 2021).

This launches p processes (pp = p, one thread each) and runs text-only microbatches of `--tokens` tokens
through a model of `--layers-per-stage` decoder layers per rank (stage 0 also embeds and runs the zero-weighted
dummy ViT pass, the last stage runs norm + head + loss). Interleaved: the same layers cut into p*v virtual
stages. For every schedule and m: one warm-up step, then the median of --repeats steps of
  idle   1 - (this rank's forward + backward compute time) / (the pipeline's span: earliest schedule start
         to latest schedule end on the shared host clock), averaged over the ranks;
  sent   bytes (and P2P messages) this rank sent in the schedule, averaged over the ranks;
  step   the span, and the full step() time (with the length broadcast and loss all-reduce).
With --json the last line is the result as JSON (tests/parallel/test_bubble.py); with --sleep-ms it also holds
each rank's timeline of the last repeat (every compute item's start and end on the host clock).

--sleep-ms S: every decoder layer's forward also sleeps S ms and its backward 2*S ms (an autograd Function
around the layer's output). Sleeping holds no core, so p processes on fewer cores behave like p devices that
compute while their host waits: the schedule, not the CPU, sets the time (use tiny --hidden/--tokens so the
real compute is small next to S). Without it (S = 0) the real matmuls are the work: needs p free cores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEDULES = ("1f1b", "interleaved_1f1b")


def _model_config(hidden: int, layers: int):
    from model.config import ModelConfig, TextConfig, VisionConfig

    head_dim = 64 if hidden >= 256 else 16
    heads = hidden // head_dim
    half = head_dim // 2
    section = (half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8)
    return ModelConfig(
        vision=VisionConfig(depth=1, embed_dim=32, num_heads=4, mlp_ratio=2.0),
        text=TextConfig(vocab_size=512, hidden_size=hidden, intermediate_size=4 * hidden, num_layers=layers,
                        num_heads=heads, num_kv_heads=heads, mrope_section=section, tie_word_embeddings=False),
        image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503,
        attn_backend="sdpa",
    )


def _text_microbatch(T: int, seed: int):
    import torch

    from core.batch import IGNORE_INDEX, PackedBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 490, (T,), generator=g)
    labels = torch.cat([ids[1:], torch.tensor([IGNORE_INDEX])])
    return PackedBatch(input_ids=ids, labels=labels, position_ids=torch.arange(T).expand(3, -1).clone(),
                       cu_seqlens=torch.tensor([0, T], dtype=torch.int32), max_seqlen=T)


def _add_sleeps(pm, seconds: float, events: list) -> None:
    """Each decoder layer: forward sleeps `seconds`, backward 2 x `seconds` (a device's compute, no CPU); every
    sleep is appended to `events` as ("F" | "B", start, end) on the host clock (time.time())."""
    import torch

    def sleep(kind: str, s: float) -> None:
        t0 = time.time()
        time.sleep(s)
        events.append((kind, t0, time.time()))

    class Sleep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            sleep("F", seconds)
            return x.clone()  # (not a view: FSDP2 warns about views returned by its root)

        @staticmethod
        def backward(ctx, g):
            sleep("B", 2 * seconds)
            return g

    for chunk in pm.modules:
        for layer in chunk.layers.values():
            layer.register_forward_hook(lambda mod, args, out: Sleep.apply(out))


def _timeline(pm, order: list, events: list) -> list:
    """[kind, chunk, microbatch, start, end] of each compute item of one step, in execution order: the item's
    first layer's sleep start to its last layer's sleep end (each chunk's layers sleep one after the other)."""
    out, i = [], 0
    for kind, chunk, mb in order:
        n = len(pm.modules[chunk].layers)
        mine = events[i : i + n]
        if len(mine) != n or any(k != kind for k, _, _ in mine):
            raise RuntimeError(f"sleeps {mine} do not match compute item {(kind, chunk, mb)}")
        out.append([kind, chunk, mb, mine[0][1], mine[-1][2]])
        i += n
    if i != len(events):
        raise RuntimeError(f"{len(events) - i} sleeps outside the schedule's compute items")
    return out


def _rank(rank: int, world: int, port: int, args: dict, q) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from model.vlm import VLModel
    from parallel import ParallelConfig, destroy_distributed, init_distributed, parallelize

    try:
        p, lps, v = world, args["layers_per_stage"], args["virtual_stages"]
        dims = init_distributed(ParallelConfig(pp=p, device="cpu"))
        out = {}
        for schedule in args["schedules"]:
            inter = schedule == "interleaved_1f1b"
            cfg = ParallelConfig(pp=p, device="cpu", pp_schedule=schedule, pp_virtual_stages=v if inter else 1,
                                 pp_first_stage_layers=lps // v if inter else lps,
                                 num_microbatches=args["microbatches"][0])  # (step() takes any valid count)
            torch.manual_seed(0)
            pm = parallelize(VLModel(_model_config(args["hidden"], lps * p)), dims, cfg)
            events: list = []
            if args["sleep_ms"] > 0:
                _add_sleeps(pm, args["sleep_ms"] / 1000, events)
            for m in args["microbatches"]:
                mbs = [_text_microbatch(args["tokens"], seed=i) for i in range(m)]
                mine = mbs if dims.is_first_stage else None
                pm.step(mine)  # warm-up: allocator, DTensor/FSDP caches
                rows = []
                for _ in range(args["repeats"]):
                    events.clear()
                    res = pm.step(mine)
                    st = res.schedule
                    spans = [None] * world
                    dist.all_gather_object(spans, (st.start_time, st.end_time))
                    span = max(e for _, e in spans) - min(s for s, _ in spans)
                    rows.append((1.0 - st.compute_s / span, span, res.step_time_s, st.sent_bytes, st.messages))
                idle, span, step_s, sent, msgs = (statistics.median(c) for c in zip(*rows))
                out[(schedule, m)] = {"idle": idle, "span_s": span, "step_s": step_s, "sent_bytes": sent,
                                      "messages": msgs,
                                      "timeline": _timeline(pm, st.order, events) if events else None}
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        if rank == 0:
            q.put(("ok", gathered))
        destroy_distributed()
    except BaseException as e:  # noqa: BLE001
        q.put(("err", f"rank {rank}: {type(e).__name__}: {e}"))
        raise


def run(stages: int, microbatches: list[int], hidden: int, tokens: int, layers_per_stage: int, repeats: int,
        schedules: tuple[str, ...] = ("1f1b",), virtual_stages: int = 2, sleep_ms: float = 0.0,
        timeout: float = 900.0) -> dict:
    if "interleaved_1f1b" in schedules:
        if layers_per_stage % virtual_stages:
            raise ValueError(f"--layers-per-stage {layers_per_stage} must be a multiple of --virtual-stages "
                             f"{virtual_stages} (equal virtual stages)")
        bad = [m for m in microbatches if m % stages]
        if bad:
            raise ValueError(f"interleaved 1F1B needs microbatch counts that are multiples of {stages}: {bad}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = {"microbatches": microbatches, "hidden": hidden, "tokens": tokens, "layers_per_stage": layers_per_stage,
            "repeats": repeats, "schedules": list(schedules), "virtual_stages": virtual_stages,
            "sleep_ms": sleep_ms}
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    procs = [ctx.Process(target=_rank, args=(r, stages, port, args, q)) for r in range(stages)]
    for p in procs:
        p.start()
    try:
        status, payload = q.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    if status != "ok":
        raise RuntimeError(payload)
    result = {"stages": stages, "cpus": os.cpu_count(), "hidden": hidden, "tokens": tokens,
              "layers_per_stage": layers_per_stage, "sleep_ms": sleep_ms, "rows": []}
    for schedule in schedules:
        v = virtual_stages if schedule == "interleaved_1f1b" else 1
        for m in microbatches:
            per = [payload[r][(schedule, m)] for r in range(stages)]
            idle = [x["idle"] for x in per]
            result["rows"].append({
                "schedule": schedule, "v": v, "m": m, "theory": (stages - 1) / (v * m + stages - 1),
                "idle_per_stage": idle, "idle_mean": sum(idle) / stages, "wall_s": per[0]["span_s"],
                "step_s": max(x["step_s"] for x in per),
                "sent_bytes_per_rank": sum(x["sent_bytes"] for x in per) / stages,
                "messages_per_rank": sum(x["messages"] for x in per) / stages,
                # With --sleep-ms: each rank's compute items of the last repeat (kind, chunk, microbatch, start, end).
                "timeline_per_stage": [x["timeline"] for x in per],
            })
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=["1f1b"])
    ap.add_argument("--virtual-stages", type=int, default=2, help="v of the interleaved schedule")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers-per-stage", type=int, default=2)
    ap.add_argument("--sleep-ms", type=float, default=0.0,
                    help="per decoder layer: forward sleeps this, backward twice this (see the docstring)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.stages > (os.cpu_count() or 1) and a.sleep_ms <= 0:
        print(f"WARNING: {a.stages} stages on {os.cpu_count()} CPUs: stages time-share cores; idle fractions are "
              "not meaningful (use --sleep-ms)", file=sys.stderr)
    res = run(a.stages, a.microbatches, a.hidden, a.tokens, a.layers_per_stage, a.repeats, tuple(a.schedules),
              a.virtual_stages, a.sleep_ms)
    work = f"sleep {a.sleep_ms:g} ms fwd / {2 * a.sleep_ms:g} ms bwd per layer" if a.sleep_ms > 0 else "real compute"
    print(f"pipeline schedules, p={a.stages} stages, hidden={a.hidden}, {a.tokens} tokens/microbatch, "
          f"{a.layers_per_stage} layers/rank, {work}, CPU gloo ({res['cpus']} cpus)")
    print(f"{'schedule':<17} {'v':>2} {'m':>3} {'theory':>7} {'idle':>6}  {'per stage':<27} {'span s':>7} "
          f"{'step s':>7} {'KB sent/rank':>12} {'msgs/rank':>9}")
    for row in res["rows"]:
        per = " ".join(f"{x:.3f}" for x in row["idle_per_stage"])
        print(f"{row['schedule']:<17} {row['v']:>2} {row['m']:>3} {row['theory']:>7.3f} {row['idle_mean']:>6.3f}  "
              f"{per:<27} {row['wall_s']:>7.3f} {row['step_s']:>7.3f} {row['sent_bytes_per_rank'] / 1024:>12.1f} "
              f"{row['messages_per_rank']:>9.1f}")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
