"""python benchmarks/bench_pipeline.py --stages 2 --microbatches 1 2 4 8 [--hidden 256 --tokens 256] [--json]

The 1F1B pipeline bubble on CPU (gloo): with p stages and m equal microbatches each stage is idle for
(p-1)/(m+p-1) of the schedule (Narayanan et al. 2021). This launches p processes (pp = p, one thread each),
runs text-only microbatches of `--tokens` tokens through a model of equal stages (stage 0 also embeds and runs
the zero-weighted dummy ViT pass, the last stage also runs norm + head + loss), and prints for every m the
measured idle fraction of every stage (median of --repeats steps after a warm-up step) next to the theory.
A stage's idle fraction is 1 - (its forward + backward compute time) / (the pipeline's span: the earliest
schedule start to the latest schedule end, on the shared host clock). With --json the last line is the
result as JSON (used by tests/parallel/test_bubble.py).

Needs p free cores for a clean figure: with more stages than cores the processes time-share and the idle
fractions mean little.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def _rank(rank: int, world: int, port: int, args: dict, q) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    from model.qwen2_vl import Qwen2VL
    from parallel import ParallelConfig, destroy_distributed, init_distributed, parallelize

    try:
        p = world
        layers = args["layers_per_stage"] * p
        cfg = ParallelConfig(pp=p, pp_first_stage_layers=args["layers_per_stage"], device="cpu")
        dims = init_distributed(cfg)
        torch.manual_seed(0)
        pm = parallelize(Qwen2VL(_model_config(args["hidden"], layers)), dims, cfg)
        out = {}
        for m in args["microbatches"]:
            mbs = [_text_microbatch(args["tokens"], seed=i) for i in range(m)]
            mine = mbs if dims.is_first_stage else None
            pm.step(mine)  # warm-up: allocator, DTensor/FSDP caches
            idle, wall = [], []
            for _ in range(args["repeats"]):
                st = pm.step(mine).schedule
                spans = [None] * world
                dist.all_gather_object(spans, (st.start_time, st.end_time))
                span = max(e for _, e in spans) - min(s for s, _ in spans)
                idle.append(1.0 - st.compute_s / span)
                wall.append(span)
            out[m] = {"idle": statistics.median(idle), "wall_s": statistics.median(wall)}
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        if rank == 0:
            q.put(("ok", gathered))
        destroy_distributed()
    except BaseException as e:  # noqa: BLE001
        q.put(("err", f"rank {rank}: {type(e).__name__}: {e}"))
        raise


def run(stages: int, microbatches: list[int], hidden: int, tokens: int, layers_per_stage: int,
        repeats: int, timeout: float = 500.0) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    args = {"microbatches": microbatches, "hidden": hidden, "tokens": tokens,
            "layers_per_stage": layers_per_stage, "repeats": repeats}
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
    result = {"stages": stages, "cpus": os.cpu_count(), "rows": []}
    for m in microbatches:
        theory = (stages - 1) / (m + stages - 1)
        idle = [payload[r][m]["idle"] for r in range(stages)]
        result["rows"].append({"m": m, "theory": theory, "idle_per_stage": idle, "idle_mean": sum(idle) / stages,
                               "wall_s": payload[0][m]["wall_s"]})
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--layers-per-stage", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.stages > (os.cpu_count() or 1):
        print(f"WARNING: {a.stages} stages on {os.cpu_count()} CPUs: stages time-share cores; idle fractions are "
              "not meaningful", file=sys.stderr)
    res = run(a.stages, a.microbatches, a.hidden, a.tokens, a.layers_per_stage, a.repeats)
    print(f"1F1B bubble, p={a.stages} stages, hidden={a.hidden}, {a.tokens} tokens/microbatch, "
          f"{a.layers_per_stage} layers/stage, CPU gloo ({res['cpus']} cpus)")
    print(f"{'m':>3} {'theory (p-1)/(m+p-1)':>22} {'measured mean':>14}  per stage                 pipeline span")
    for row in res["rows"]:
        per = " ".join(f"{x:.3f}" for x in row["idle_per_stage"])
        print(f"{row['m']:>3} {row['theory']:>22.3f} {row['idle_mean']:>14.3f}  {per:<25} {row['wall_s']:.3f}s")
    if a.json:
        print(json.dumps(res))


if __name__ == "__main__":
    main()
