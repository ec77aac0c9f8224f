"""Shared video-test helpers: real H.264 clips encoded at test time with PyAV (a real photo panning across
frame so that every frame differs), and a reference statement of qwen-vl-utils' sampling formula."""

from __future__ import annotations

import math
import os
import tempfile
from functools import lru_cache

import av
import numpy as np
from PIL import Image


@lru_cache(maxsize=32)
def encode_clip(width: int, height: int, nframes: int, fps: int = 30, faststart: bool = False) -> bytes:
    """H.264 / yuv420p MP4 bytes: the astronaut photo panning 4 px per frame, plus a frame-number bar."""
    from skimage import data as skd

    base = np.asarray(Image.fromarray(skd.astronaut()).resize((width, height), Image.BICUBIC))
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        opts = {"movflags": "faststart"} if faststart else {}
        with av.open(path, "w", format="mp4", options=opts) as c:
            s = c.add_stream("libx264", rate=fps)
            s.width, s.height, s.pix_fmt = width, height, "yuv420p"
            s.options = {"preset": "ultrafast", "crf": "18"}
            for i in range(nframes):
                fr = np.roll(base, 4 * i, axis=1).copy()
                fr[: max(2, height // 20), : int(width * (i + 1) / nframes)] = 255
                for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


# ---- qwen-vl-utils 0.0.14, restated (its module imports torchvision at import time, which cannot be installed
# beside torch 2.13 CPU here). Source: qwen_vl_utils/vision_process.py: smart_nframes, fetch_video,
# _read_video_torchvision / _read_video_torchcodec, smart_resize.
QWEN_FRAME_FACTOR = 2


def qwen_smart_resize(height, width, factor, min_pixels, max_pixels):
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen_smart_nframes(ele, total_frames, video_fps):
    fps = ele.get("fps", 2.0)
    min_frames = math.ceil(ele.get("min_frames", 4) / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR
    max_frames = math.floor(ele.get("max_frames", min(768, total_frames)) / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR
    nframes = total_frames / video_fps * fps
    nframes = min(min(max(nframes, min_frames), max_frames), total_frames)
    nframes = math.floor(nframes / QWEN_FRAME_FACTOR) * QWEN_FRAME_FACTOR
    if not (QWEN_FRAME_FACTOR <= nframes <= total_frames):
        raise ValueError(f"nframes should in interval [{QWEN_FRAME_FACTOR}, {total_frames}], but got {nframes}.")
    return nframes


def qwen_fetch_video_plan(ele, total_frames, video_fps, height, width, image_patch_size=14):
    """(frame indices, resized (h, w), sample_fps) exactly as fetch_video computes them (`image_patch_size`: 14 for
    Qwen2-VL / Qwen2.5-VL, 16 for Qwen3-VL, whose factor is 2 x that)."""
    import torch

    factor = image_patch_size * 2
    nframes = qwen_smart_nframes(ele, total_frames, video_fps)
    idx = torch.linspace(0, total_frames - 1, nframes).round().long().tolist()
    sample_fps = nframes / max(total_frames, 1e-6) * video_fps
    min_pixels = ele.get("min_pixels", 128 * factor**2)
    total_pixels = ele["total_pixels"]
    video_frame_max_pixels = 768 * factor**2
    max_pixels = max(min(video_frame_max_pixels, total_pixels / nframes * QWEN_FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
    h, w = qwen_smart_resize(height, width, factor, min_pixels, max_pixels)
    return idx, (h, w), sample_fps
