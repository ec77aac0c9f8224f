"""python benchmarks/bench_loader.py [--samples 600] [--max-tokens 8192] [--workers 2]

Loader throughput, training-ready microbatches per second, ours versus the transformers Qwen2VLProcessor path on
the SAME samples (the same WebDataset shards on local disk), printed as ratios per core.

  ours           data.loader.build_loader: shards + sidecar index -> ChatML render + tokenize (tokenizers) ->
                 PIL decode/resize -> best-fit packing -> PackedBatch with labels, M-RoPE positions, pixel rows;
                 one process (num_workers=0) and --workers DataLoader workers.
  transformers   webdataset reads the shards; per sample: json.loads, PIL decode, Qwen2VLProcessor
                 .apply_chat_template(tokenize=True, return_assistant_tokens_mask=True) with the Qwen2-VL
                 template (images expanded and processed by Qwen2VLImageProcessorPil, labels from the
                 assistant mask), then the SAME per-sample position ids and the same packer/concatenation as ours,
                 so both produce the same kind of microbatch. One process, and --workers DataLoader workers
                 (shards split over workers, as webdataset does).

The data: a realistic SFT/pretraining mix of real photos (scikit-image) as JPEG at COCO-like and document
sizes, real English text (docstrings of the Python standard library): 45% single-image chat (1-3 turns),
25% text-only chat, 20% captions (pretraining samples), 10% document pages (1000-1400 px). max_pixels is
1280*28*28 (transformers' processor default). Timing covers one epoch from iter() to the last microbatch
(DataLoader worker start-up included; tokenizer loading excluded; the transformers workers build their processor
inside the timed window, about a second). Ratios: same worker count on both sides, and ours_W / W against the
one-core transformers path (torch runs with one thread in every process). Target: >= 3x per core. Both
wall-clock rates and samples per CPU-second (process + joined worker CPU time, from getrusage) are printed: on a
shared machine the CPU-second figures are the reliable per-core comparison, the wall-clock ones move with the
machine's other load.
"""

from __future__ import annotations

import argparse
import inspect as pyinspect
import io
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MAX_PIXELS = 1280 * 28 * 28


def cpu_seconds() -> float:
    """CPU time of this process plus its finished children (the DataLoader workers, once joined)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _words() -> list[str]:
    import argparse as a
    import collections
    import json as j
    import tarfile
    import textwrap
    import typing

    text = " ".join(pyinspect.getdoc(m) or "" for m in (a, collections, j, tarfile, textwrap, typing, pyinspect, io))
    text += " ".join(pyinspect.getdoc(getattr(collections, n)) or "" for n in dir(collections) if n[0].isupper())
    return text.split()


def build_dataset(root: str, n: int, seed: int = 0) -> str:
    import skimage.data as sd

    from data.shards.make import make

    rng = np.random.default_rng(seed)
    words = _words()
    photos = [getattr(sd, k)() for k in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                                          "hubble_deep_field", "colorwheel")]
    pages = [np.stack([getattr(sd, k)()] * 3, -1) for k in ("page", "text")]
    media = os.path.join(root, "media")
    os.makedirs(media, exist_ok=True)

    def text(median: float) -> str:
        k = int(np.clip(rng.lognormal(np.log(median), 0.8), 3, 2000))
        s = int(rng.integers(0, max(1, len(words) - k)))
        return " ".join(words[s : s + k])

    def image(i: int, size: tuple[int, int], pool) -> str:
        name = f"im{i}.jpg"
        arr = pool[int(rng.integers(len(pool)))]
        Image.fromarray(arr).convert("RGB").resize(size, Image.Resampling.BILINEAR).save(
            os.path.join(media, name), quality=90)
        return name

    coco = [(640, 480), (480, 640), (640, 427), (500, 375), (612, 612)]
    lines = []
    for i in range(n):
        kind = rng.choice(4, p=[0.45, 0.25, 0.20, 0.10])
        if kind == 0:
            msgs = []
            for t in range(int(rng.integers(1, 4))):
                content = [{"type": "text", "text": text(25) + "?"}]
                if t == 0:
                    content.insert(0, {"type": "image", "image": image(i, coco[int(rng.integers(len(coco)))], photos)})
                msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": text(90)}]
            lines.append({"messages": msgs})
        elif kind == 1:
            lines.append({"messages": [{"role": "user", "content": text(60)},
                                       {"role": "assistant", "content": text(250)}]})
        elif kind == 2:
            side = int(rng.integers(224, 1025))
            lines.append({"content": [{"type": "image", "image": image(i, (side, int(side * 0.75)), photos)},
                                      {"type": "text", "text": text(20)}]})
        else:
            w = int(rng.integers(1000, 1401))
            lines.append({"messages": [
                {"role": "user", "content": [{"type": "image", "image": image(i, (w, int(w * 1.3)), pages)},
                                             {"type": "text", "text": "Transcribe the page."}]},
                {"role": "assistant", "content": text(400)}]})
    jsonl = os.path.join(root, "in.jsonl")
    with open(jsonl, "w") as f:
        for obj in lines:
            f.write(json.dumps(obj) + "\n")
    out = os.path.join(root, "shards")
    make(jsonl, media, out, samples_per_shard=64)
    return out


def run_ours(shards: str, tok: str, workers: int, max_tokens: int) -> dict:
    from data.config import DataConfig, DatasetSpec
    from data.loader import build_loader
    from data.tokenizer import Tokenizer

    Tokenizer.load(tok)
    cfg = DataConfig(datasets=[DatasetSpec(shards)], tokenizer=tok, max_tokens=max_tokens, max_pixels=MAX_PIXELS,
                     epochs=1, num_workers=workers, shuffle_buffer=64, pack_buffer=128)
    loader = build_loader(cfg, 0, 1)
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    first = None
    n_batches = n_samples = n_tokens = 0
    for b in loader:  # timed from iter() (worker start-up included) to the last microbatch
        if first is None:
            first = time.perf_counter() - t0
        n_batches += 1
        n_samples += len(b.sample_keys)
        n_tokens += b.num_tokens
    dt = time.perf_counter() - t0
    loader.close()  # joins the workers, so their CPU time is counted
    cpu = cpu_seconds() - c0
    m = loader.metrics()
    return {"seconds": dt, "cpu_s": cpu, "batches": n_batches, "samples": n_samples, "tokens": n_tokens,
            "first_s": first, "efficiency": m["packing_efficiency"], "skipped": m["skipped"]}


def hf_batches(urls: list[str], max_tokens: int):
    """The transformers path: PackedBatches from shards, one sample at a time through Qwen2VLProcessor."""
    import torch
    import webdataset as wds
    from datahelpers import QWEN2VL_MASK_TEMPLATE, hf_processor

    from data.packing import Entry, Packer, assemble
    from data.sample import Processed, shift_labels
    from model.position_ids import mrope_position_ids

    proc = hf_processor(4 * 28 * 28, MAX_PIXELS)
    eos = proc.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    packer = Packer(max_tokens, 4 * max_tokens, 128, 1 << 62)
    # (in DataLoader workers, webdataset gives each worker every W-th shard: split_by_worker)
    for s in wds.WebDataset(urls, shardshuffle=False, workersplitter=wds.split_by_worker):
        obj = json.loads(s["json"])
        msgs = obj.get("messages") or [{"role": "user", "content": obj["content"]}]
        images = []
        for m in msgs:
            if isinstance(m["content"], list):
                for it in m["content"]:
                    if it.get("type") == "image":
                        # transformers loads images from the messages (path, URL or PIL image): hand it the
                        # opened member, as a user of this path would
                        it["image"] = Image.open(io.BytesIO(s[it["image"]]))
                        images.append(it["image"])
        if "messages" in obj:
            out = proc.apply_chat_template(msgs, chat_template=QWEN2VL_MASK_TEMPLATE, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True,
                                           return_tensors="np")
            if images:
                assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(-1).sum())
            ids = out["input_ids"][0]
            mask = out["assistant_masks"][0].astype(bool)
        else:  # pretraining: the items rendered, then processor(text, images)
            text = "".join("<|vision_start|><|image_pad|><|vision_end|>" if it.get("type") == "image"
                           else it.get("text", "") for it in obj["content"])
            out = proc(text=[text], images=images or None, return_tensors="np")
            ids = np.concatenate([out["input_ids"][0], [eos]])
            mask = ~np.isin(ids, [151652, 151653, 151655])
        if len(ids) > max_tokens:
            continue
        grids = out.get("image_grid_thw")
        ids_t = torch.from_numpy(ids.astype(np.int64))
        pos = mrope_position_ids(ids_t, torch.from_numpy(grids) if grids is not None else None)
        sample = Processed(s["__key__"], ids_t, torch.from_numpy(shift_labels(ids, mask)), pos)
        if grids is not None:
            # Keep transformers' float rows: hand them to assemble() through the video slot's concatenation.
            sample.video_rows = [torch.from_numpy(out["pixel_values"])]
            sample.video_grids = [tuple(int(x) for x in g) for g in grids]
        packer.add(Entry((), sample))
        if packer.full():
            yield assemble([e.sample for e in packer.pop_bin()])
    while len(packer):
        yield assemble([e.sample for e in packer.pop_bin()])


class _HFWorkers:
    """The transformers path in DataLoader workers: worker i takes shards i, i+W, ... (webdataset's split)."""

    def __init__(self, urls: list[str], max_tokens: int) -> None:
        self.urls, self.max_tokens = urls, max_tokens

    def __iter__(self):
        for b in hf_batches(self.urls, self.max_tokens):
            yield b.as_dict()


def run_transformers(shards: str, max_tokens: int, workers: int = 0) -> dict:
    from torch.utils.data import DataLoader, IterableDataset

    urls = sorted(os.path.join(shards, f) for f in os.listdir(shards) if f.endswith(".tar"))
    stats = {"batches": 0, "samples": 0, "tokens": 0}
    if workers:
        ds = type("HFIterable", (_HFWorkers, IterableDataset), {})(urls, max_tokens)
        source = DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=lambda x: x)
    else:
        source = (b.as_dict() for b in hf_batches(urls, max_tokens))
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    for d in source:
        stats["batches"] += 1
        stats["samples"] += len(d["sample_keys"])
        stats["tokens"] += int(d["input_ids"].numel())
    stats["seconds"] = time.perf_counter() - t0
    del source
    stats["cpu_s"] = cpu_seconds() - c0
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from datahelpers import tokenizer_dir

    tok = tokenizer_dir()
    import torch

    # One core per process for per-core figures (DataLoader workers use one thread each anyway).
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        shards = build_dataset(root, args.samples, args.seed)
        print(f"dataset: {args.samples} samples in {shards}; max_tokens {args.max_tokens}, max_pixels {MAX_PIXELS}")
        hf = run_transformers(shards, args.max_tokens)
        hfw = run_transformers(shards, args.max_tokens, args.workers) if args.workers else None
        o0 = run_ours(shards, tok, 0, args.max_tokens)
        ow = run_ours(shards, tok, args.workers, args.max_tokens) if args.workers else None
    # Every path must have produced the same samples (else a ratio compares different work).
    for r in (hfw, o0, ow):
        if r is not None and r["samples"] != hf["samples"]:
            raise SystemExit(f"sample counts differ: {hf['samples']} vs {r['samples']}")
    rate = lambda r: (r["batches"] / r["seconds"], r["samples"] / r["seconds"])  # noqa: E731
    for name, r in (("transformers path, 0 workers", hf), (f"transformers path, {args.workers} workers", hfw),
                    ("ours, 0 workers", o0), (f"ours, {args.workers} workers", ow)):
        if r is None:
            continue
        mb, sps = rate(r)
        first = f", first microbatch after {r['first_s']:.2f}s" if "first_s" in r else ""
        print(f"{name:32s} {mb:7.2f} microbatches/s  {sps:8.1f} samples/s wall  "
              f"{r['samples'] / r['cpu_s']:8.1f} samples per CPU-second  ({r['samples']} samples, "
              f"{r['batches']} microbatches, {r['seconds']:.2f}s wall, {r['cpu_s']:.2f} CPU-s{first})")
    print(f"packing efficiency (ours): {o0['efficiency']:.4f}; skipped: {o0['skipped']}")
    base, base_cpu = rate(hf)[1], hf["samples"] / hf["cpu_s"]
    print(f"ratio, 0 workers (one core each): {rate(o0)[1] / base:.2f}x samples/s wall, "
          f"{o0['samples'] / o0['cpu_s'] / base_cpu:.2f}x samples per CPU-second")
    if ow and hfw:
        print(f"ratio, {args.workers} workers each: {rate(ow)[1] / rate(hfw)[1]:.2f}x samples/s wall, "
              f"{ow['samples'] / ow['cpu_s'] / (hfw['samples'] / hfw['cpu_s']):.2f}x samples per CPU-second")
        print(f"ours with {args.workers} workers per core vs the one-process transformers path: "
              f"{rate(ow)[1] / args.workers / base:.2f}x wall, {ow['samples'] / ow['cpu_s'] / base_cpu:.2f}x per "
              "CPU-second")


if __name__ == "__main__":
    main()
