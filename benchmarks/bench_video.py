"""Cold decode vs decode-cache hit, and PyAV vs ffmpeg backends, on real H.264 clips encoded here.

    python benchmarks/bench_video.py [--seconds 30] [--width 1280 --height 720] [--clips 2] [--threads 0]

Prints seconds per clip for: cold load_video (decode + sample + resize + patchify) per backend, and a cache hit
(read + checksum + patchify), and the ratio cold / hit (target >= 10x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import av  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from data.media import video_cache  # noqa: E402
from data.media.video import VideoConfig  # noqa: E402
from data.media.video_cache import load_video  # noqa: E402


def encode(path: str, w: int, h: int, seconds: float, fps: int, seed: int) -> None:
    from skimage import data as skd

    photo = [skd.astronaut(), skd.coffee(), skd.chelsea()][seed % 3]
    base = np.asarray(Image.fromarray(photo).resize((w, h), Image.BICUBIC))
    with av.open(path, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "veryfast", "crf": "23", "g": "250"}
        for i in range(int(seconds * fps)):
            fr = np.roll(base, 3 * i, axis=1)
            for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def timed(fn, reps: int = 1) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="decode threads (0 = FFmpeg's choice)")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    clips = []
    t0 = time.perf_counter()
    for i in range(a.clips):
        p = os.path.join(tmp, f"clip{i}.mp4")
        encode(p, a.width, a.height, a.seconds, a.fps, i)
        with open(p, "rb") as f:
            clips.append(f.read())
    print(f"encoded {a.clips} clips of {a.seconds:.0f}s {a.width}x{a.height}@{a.fps} "
          f"({sum(map(len, clips)) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s; cpus={os.cpu_count()}")
    res = {}
    for backend in ("pyav", "ffmpeg"):
        cfg = VideoConfig(backend=backend, decode_threads=a.threads, decode_timeout_s=600)
        res[backend] = sum(timed(lambda d=d, c=cfg: load_video(d, c)) for d in clips) / len(clips)
    clip = load_video(clips[0], VideoConfig())
    print(f"sampled: {len(clip.frame_indices)} frames, grid {clip.grid_thw}, {clip.num_tokens} tokens, "
          f"fps_used {clip.fps_used:.2f}")
    cache_dir = os.path.join(tmp, "cache")
    cfg = VideoConfig(cache_dir=cache_dir, decode_threads=a.threads, decode_timeout_s=600)
    fill = sum(timed(lambda d=d: load_video(d, cfg)) for d in clips) / len(clips)
    hit = sum(timed(lambda d=d: load_video(d, cfg), reps=3) for d in clips) / len(clips)
    trusted = VideoConfig(cache_dir=cache_dir, cache_trust_identity=True, decode_threads=a.threads)
    for i, d in enumerate(clips):
        load_video(d, trusted, identity=f"etag-{i}")
    hit_etag = sum(timed(lambda i=i, d=d: load_video(d, trusted, identity=f"etag-{i}"), reps=3)
                   for i, d in enumerate(clips)) / len(clips)
    m = video_cache.cache_metrics()
    entry_mb = video_cache.get_cache(cfg).total_bytes() / 1e6 / (2 * len(clips))
    print(f"cold decode  pyav   {res['pyav']:.3f} s/clip")
    print(f"cold decode  ffmpeg {res['ffmpeg']:.3f} s/clip   (pyav / ffmpeg time = {res['pyav'] / res['ffmpeg']:.2f})")
    print(f"cache fill   pyav   {fill:.3f} s/clip (decode + write, entry {entry_mb:.1f} MB)")
    print(f"cache hit           {hit:.3f} s/clip (content sha256 key)   cold/hit = {res['pyav'] / hit:.1f}x")
    print(f"cache hit           {hit_etag:.3f} s/clip (trusted ETag key)     cold/hit = {res['pyav'] / hit_etag:.1f}x")
    print(f"cache metrics {m}")


if __name__ == "__main__":
    main()
