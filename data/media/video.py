"""Videos for every Qwen-VL family: decode from in-memory bytes, sample at 2 fps, resize under a token budget,
patchify.

Shape legend: F = sampled frames, H/W = resized height/width, C = 3, N = patch rows, T = temporal patch (2),
f = resize factor (the family's patch x merge: 28 for Qwen2-VL / Qwen2.5-VL, 32 for Qwen3-VL), P = row length.

Sampling is qwen-vl-utils' (0.0.14 `smart_nframes` + `fetch_video`, which every family's reference pipeline
uses; `image_patch_size` gives the factor):

    nframes   = floorT(clamp(total_frames / video_fps * fps, ceilT(min_frames), floorT(min(max_frames, total))))
    indices   = round(linspace(0, total_frames - 1, nframes))           (torch.linspace, round half to even)
    per frame = max(min(max_pixels, total_pixels / nframes * T), int(min_pixels * 1.05))
    (h, w)    = smart_resize(H, W, f, min_pixels, per frame)             total_pixels = max_tokens * f * f

with min_pixels / max_pixels 128 and 768 merged tokens per frame (x f^2) unless configured, so a video yields at
most `max_tokens` merged tokens (t/T * h/f * w/f) - except that the 1.05 x min_pixels floor can exceed the
budget on long videos. There qwen-vl-utils overshoots; we keep the cap HARD: the frame count is lowered (an even
number of evenly spaced frames, i.e. a lower effective fps) until the tokens fit, and `fps_used` records the rate
actually sampled. Frames are resized with PIL bicubic (antialiased like the torchvision resize qwen-vl-utils uses;
measured difference <= 2/255, see docs/storage_video.md) and patchified by data.media.vision (transformers' row
order); the model normalizes them on the device with the family's mean / std.

How a clip's time reaches the model is the family's (model.processing.VisionProcessing.video_time), from what the
clip carries: Qwen2.5-VL's seconds per frame pair are T / fps_used (transformers' second_per_grid_ts), Qwen3-VL's
per-pair timestamps come from `frame_indices` and the source `video_fps` (its processor's _calculate_timestamps).

Decoding: backend "pyav" (default: in-process, bundled FFmpeg, frame-threaded) or "ffmpeg" (the imageio-ffmpeg
binary in a subprocess). Every decode runs under a wall-clock watchdog (`decode_timeout_s`); a corrupt,
truncated, zero-length, over-reporting (header claims frames the stream does not hold) or timed-out video
raises VideoDecodeError, which the loader counts as a skip. Decoded, sampled, resized uint8 frames can be
cached on local disk (data/media/video_cache.py) so a video is decoded once per node.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from PIL import Image

from data.media.vision import AspectRatioError, smart_resize, video_rows_raw, vision_or_default
from model.processing import VisionProcessing
from model.vision import normalize_pixel_rows

BACKENDS = ("pyav", "ffmpeg")
DEFAULT_MAX_TOKENS = 16384  # the cap on merged tokens per video (the Qwen2-VL paper's 16384)
FRAME_MIN_TOKENS = 128  # qwen-vl-utils' VIDEO_MIN_TOKEN_NUM: smallest frame, in merged tokens (every family)
FRAME_MAX_TOKENS = 768  # qwen-vl-utils' VIDEO_MAX_TOKEN_NUM: largest frame, in merged tokens (every family)
RESIZE_METHOD = "pil-bicubic-v1"  # part of the cache key: a change here must not reuse old frames


class VideoDecodeError(ValueError):
    """The video cannot be used: the loader counts a skip under `reason` (empty, open_failed, no_video_stream,
    over_reporting, decode_failed, timeout, aspect_ratio, too_large)."""

    def __init__(self, message: str, reason: str = "decode_failed"):
        super().__init__(message)
        self.reason = reason


@dataclass
class VideoConfig:
    """How videos are sampled, decoded and cached (recipe `data.video`). Defaults are qwen-vl-utils' for every
    family (2 fps, 4..768 frames, 128..768 merged tokens per frame)."""

    fps: float = 2.0
    """Frames sampled per second of video (before the token cap lowers it on long videos)."""
    min_frames: int = 4
    """Fewest frames sampled (rounded up to a multiple of 2), if the video has that many."""
    max_frames: int = 768
    """Most frames sampled (rounded down to a multiple of 2)."""
    min_pixels: int | None = None
    """Smallest resized frame area (pixels); the 1.05 x floor of qwen-vl-utils applies. None = the family's
    default, 128 merged tokens: 128 x factor^2 (factor = patch x merge: 28 for Qwen2-VL / Qwen2.5-VL, 100352
    pixels; 32 for Qwen3-VL, 131072)."""
    max_pixels: int | None = None
    """Largest resized frame area (pixels) before the per-video budget lowers it. None = the family's default,
    768 merged tokens: 768 x factor^2 (602112 pixels at factor 28, 786432 at 32)."""
    max_tokens: int = 0
    """Hard cap on merged tokens per video (t/2 * h/f * w/f at the family's factor f): sets the per-video pixel
    budget (max_tokens * f * f) and, when the per-frame minimum would still exceed it, lowers the frame count.
    0 = 16384, which the loader lowers to what a video sample's microbatch holds
    (data.max_video_sample_patches / 4 and 3/4 of data.max_video_sample_tokens, the rest left to the text); an
    explicit value must fit those budgets (checked when the data config is parsed)."""
    backend: Literal["pyav", "ffmpeg"] = "pyav"
    """Decoder: "pyav" (in-process, default) or "ffmpeg" (imageio-ffmpeg binary, a subprocess)."""
    decode_threads: int = 0
    """FFmpeg decoding threads per video; 0 = FFmpeg's choice (all cores). Use 1-2 with many DataLoader
    workers so workers do not oversubscribe the cores."""
    decode_timeout_s: float = 60.0
    """Wall-clock limit for one decode; past it the video is a counted skip (reason "timeout")."""
    frame_count_tolerance: float = 0.02
    """A header may claim at most this fraction more frames than the stream holds before the video counts as
    over-reporting (a few frames of slack are common in real files)."""
    cache_dir: str | None = None
    """Local directory for the decode cache (data/media/video_cache.py); None = no cache."""
    cache_max_bytes: int = 50 * 1024**3
    """Size cap of the cache directory; least recently used entries are evicted past it."""
    cache_trust_identity: bool = False
    """Key the cache by the identity the caller passes (it must change whenever the bytes do, like an ETag)
    instead of the content's sha256 (about 1.5 ms per MB). Leave False when identities are names."""
    cache_wait_s: float = 0.0
    """How long a process waits for another process that is decoding the same video before decoding it
    itself; 0 = decode_timeout_s."""

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"video.backend must be one of {BACKENDS}, got {self.backend!r}")
        if not self.fps > 0:
            raise ValueError(f"video.fps must be > 0, got {self.fps}")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"video needs 1 <= min_frames <= max_frames, got {self.min_frames}, {self.max_frames}")
        for k in ("min_pixels", "max_pixels"):
            if getattr(self, k) is not None and not getattr(self, k) > 0:
                raise ValueError(f"video.{k} must be > 0 or null (the family's default), got {getattr(self, k)}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"video needs min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")
        if self.max_tokens < 0:
            raise ValueError(f"video.max_tokens must be >= 0 (0 = automatic), got {self.max_tokens}")
        if self.min_pixels is None:  # the floor in tokens is then the same for every family
            self.check()
        if not self.decode_timeout_s > 0:
            raise ValueError(f"video.decode_timeout_s must be > 0, got {self.decode_timeout_s}")
        if self.decode_threads < 0:
            raise ValueError(f"video.decode_threads must be >= 0, got {self.decode_threads}")
        if self.cache_max_bytes <= 0:
            raise ValueError(f"video.cache_max_bytes must be > 0, got {self.cache_max_bytes}")

    @property
    def token_cap(self) -> int:
        """The cap in force: max_tokens, or DEFAULT_MAX_TOKENS when it is 0 (automatic) and nobody lowered it."""
        return self.max_tokens or DEFAULT_MAX_TOKENS

    def frame_pixels(self, vision: VisionProcessing | None = None) -> tuple[int, int]:
        """(min_pixels, max_pixels) of a frame in force for the family: the configured values, or 128 and 768
        merged tokens of factor x factor pixels."""
        f = vision_or_default(vision).factor
        lo = FRAME_MIN_TOKENS * f * f if self.min_pixels is None else self.min_pixels
        hi = FRAME_MAX_TOKENS * f * f if self.max_pixels is None else self.max_pixels
        return lo, hi

    def floor_tokens(self, vision: VisionProcessing | None = None) -> int:
        """Tokens of one frame pair at qwen-vl-utils' per-frame floor (1.05 x min_pixels) at the family's factor:
        the smallest cap that holds a frame pair of every video."""
        f = vision_or_default(vision).factor
        return math.ceil(int(self.frame_pixels(vision)[0] * 1.05) / (f * f))

    def check(self, vision: VisionProcessing | None = None) -> None:
        """The checks that need the family's factor (ValueError naming the fix): the frame bounds in force are
        ordered and an explicit max_tokens holds one frame pair."""
        lo, hi = self.frame_pixels(vision)
        if lo > hi:
            raise ValueError(f"video needs min_pixels <= max_pixels, got {lo}, {hi} (null = the family's default: "
                             f"{FRAME_MIN_TOKENS} and {FRAME_MAX_TOKENS} merged tokens per frame)")
        floor = self.floor_tokens(vision)
        if self.max_tokens and self.max_tokens < floor:
            raise ValueError(
                f"video.max_tokens={self.max_tokens} is below one frame pair at min_pixels "
                f"({floor} tokens): raise max_tokens or lower min_pixels"
            )


@dataclass
class VideoClip:
    """One processed video, ready for packing."""

    rows_u8: torch.Tensor
    """(grid_t * grid_h * grid_w, P) uint8 RAW rows in transformers' order (before rescale and normalization,
    which model.vision.normalize_pixel_rows applies on the device): what the loader ships."""
    grid_thw: tuple[int, int, int]
    """(frames / T, h / p, w / p): the row for video_grid_thw."""
    fps_used: float
    """Frames per second of video actually sampled (lower than cfg.fps when the token cap bit)."""
    frame_indices: list[int]
    """Indices of the decoded frames used, in order (before the padding to whole frame pairs)."""
    video_fps: float = 0.0
    """Frame rate of the source video (its timestamps: Qwen3-VL's text timestamps come from it)."""
    vision: VisionProcessing | None = None
    """The family's processor facts the rows were made with (None: Qwen2-VL's)."""

    @property
    def pixel_values(self) -> torch.Tensor:
        """(N, P) float32: the processor's normalized rows (computed from rows_u8 on demand)."""
        return normalize_pixel_rows(self.rows_u8, vision_or_default(self.vision))

    @property
    def num_tokens(self) -> int:
        """Merged tokens (<|video_pad|> count) this clip takes in the LLM sequence."""
        t, h, w = self.grid_thw
        m = vision_or_default(self.vision).merge_size
        return t * h * w // (m * m)

    @property
    def seconds_per_pair(self) -> float:
        """Seconds of video per temporal patch: temporal patch / sampled fps (Qwen2.5-VL's second_per_grid_ts)."""
        return vision_or_default(self.vision).temporal_patch_size / self.fps_used

    def frame_pair_timestamps(self) -> list[float]:
        """Qwen3-VL: each frame pair's time in seconds, as its processor computes it from the sampled frame indices
        and the source fps."""
        return vision_or_default(self.vision).frame_pair_timestamps(self.frame_indices, self.video_fps)


@dataclass
class SamplingPlan:
    nframes: int
    indices: list[int]
    height: int
    width: int
    fps_used: float
    capped: bool = False
    """True when the hard token cap lowered the frame count below Qwen's."""
    native_hw: tuple[int, int] = (0, 0)
    """Decoded frame size (height, width) before the resize."""
    video_fps: float = 0.0
    """Frame rate of the source video."""
    patch_size: int = 14
    temporal_patch_size: int = 2

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """The clip's (t, h, w) patch grid: what decoding these frames will give (padded to whole frame pairs)."""
        T, p = self.temporal_patch_size, self.patch_size
        return _ceil_t(self.nframes, T) // T, self.height // p, self.width // p


@dataclass
class SampledFrames:
    """What the decode cache stores: sampled, resized uint8 frames plus how they were chosen."""

    frames_FHWC: np.ndarray
    frame_indices: list[int]
    fps_used: float
    meta: dict = field(default_factory=dict)


def _floor_t(x: float, T: int) -> int:
    return math.floor(x / T) * T


def _ceil_t(x: float, T: int) -> int:
    return math.ceil(x / T) * T


def plan_sampling(total_frames: int, video_fps: float, height: int, width: int, cfg: VideoConfig,
                  vision: VisionProcessing | None = None) -> SamplingPlan:
    """Which frames to keep and their resized size at the family's factor (pure: the parity tests check it against
    Qwen's formula). `vision` None: Qwen2-VL's facts."""
    v = vision_or_default(vision)
    T, f = v.temporal_patch_size, v.factor
    if total_frames < 1 or not video_fps > 0:
        raise VideoDecodeError(f"video has {total_frames} frames at {video_fps} fps", "decode_failed")
    if total_frames < T:
        nframes = total_frames  # one frame: patchify repeats it to fill the temporal patch
    else:
        min_frames = _ceil_t(cfg.min_frames, T)
        max_frames = _floor_t(min(cfg.max_frames, total_frames), T)
        n = total_frames / video_fps * cfg.fps
        nframes = _floor_t(min(min(max(n, min_frames), max_frames), total_frames), T)
    cap = cfg.token_cap
    total_pixels = cap * f * f
    min_pixels, max_pixels = cfg.frame_pixels(v)
    per_frame = max(min(max_pixels, total_pixels / nframes * T), int(min_pixels * 1.05))
    per_frame = min(max_pixels, per_frame)  # as fetch_video: the configured max_pixels wins over the floor
    try:
        h, w = smart_resize(height, width, f, min_pixels, per_frame)
    except AspectRatioError as e:
        raise VideoDecodeError(str(e), "aspect_ratio") from None
    tokens_per_pair = (h // f) * (w // f)
    capped = False
    if _ceil_t(nframes, T) // T * tokens_per_pair > cap:
        max_pairs = cap // tokens_per_pair
        if max_pairs < 1:
            raise VideoDecodeError(
                f"one frame pair at {h}x{w} is {tokens_per_pair} tokens > max_tokens={cap}", "too_large"
            )
        nframes = min(nframes, max_pairs * T)
        capped = True
    idx = torch.linspace(0, total_frames - 1, nframes).round().long().tolist()
    return SamplingPlan(nframes, idx, h, w, nframes / total_frames * video_fps, capped, (height, width),
                        float(video_fps), v.patch_size, T)


class _Deadline:
    """Cooperative abort for an in-process decode: checked between packets, frames and reads."""

    def __init__(self, seconds: float):
        self.t_end = time.monotonic() + seconds
        self.seconds = seconds
        self.aborted = threading.Event()

    def check(self) -> None:
        if self.aborted.is_set() or time.monotonic() > self.t_end:
            self.aborted.set()
            raise VideoDecodeError(f"video decode exceeded {self.seconds:.1f}s", "timeout")


class _DeadlineReader(io.RawIOBase):
    """The video bytes as a file for PyAV, checking the deadline on every read and seek (FFmpeg calls these
    from inside its demuxer, so a demuxer that loops over the input is stopped too)."""

    def __init__(self, data: bytes, deadline: _Deadline):
        self._b = io.BytesIO(data)
        self._d = deadline

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        self._d.check()
        return self._b.readinto(b)

    def seek(self, offset: int, whence: int = 0) -> int:
        self._d.check()
        return self._b.seek(offset, whence)

    def tell(self) -> int:
        return self._b.tell()


@dataclass
class _Probe:
    frames: int
    """Frames the stream really holds (video packets with data): the total that sampling uses."""
    reported: int
    """Frames the container header claims (0 = unknown)."""
    fps: float
    height: int
    width: int


def _probe(data: bytes, deadline: _Deadline, cfg: VideoConfig) -> _Probe:
    """Count the frames by demuxing without decoding (cheap), and reject over-reporting videos: a header that
    claims more frames than the stream holds (beyond `frame_count_tolerance`) marks a broken or lying file."""
    import av

    try:
        with av.open(_DeadlineReader(data, deadline), mode="r", metadata_errors="ignore") as c:
            if not c.streams.video:
                raise VideoDecodeError("no video stream", "no_video_stream")
            s = c.streams.video[0]
            reported = int(s.frames or 0)
            rate = s.average_rate or s.guessed_rate or s.base_rate
            height, width = int(s.codec_context.height), int(s.codec_context.width)
            packets = 0
            for p in c.demux(s):
                if p.size:
                    packets += 1
                    if packets % 64 == 0:
                        deadline.check()
    except VideoDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many types for broken input; all are a skip
        raise VideoDecodeError(f"cannot open video: {type(e).__name__}: {e}", "open_failed") from None
    if packets == 0:
        raise VideoDecodeError("video stream holds no frames", "decode_failed")
    if reported and packets < reported * (1.0 - cfg.frame_count_tolerance) - 1:
        raise VideoDecodeError(
            f"over-reporting video: header claims {reported} frames, stream holds {packets}", "over_reporting"
        )
    fps = float(rate) if rate else 0.0
    if not fps > 0:
        raise VideoDecodeError("video has no frame rate", "decode_failed")
    if height <= 0 or width <= 0:
        raise VideoDecodeError(f"video has a zero side: {height}x{width}", "decode_failed")
    return _Probe(packets, reported, fps, height, width)


def _resize(rgb_HWC: np.ndarray, h: int, w: int) -> np.ndarray:
    if rgb_HWC.shape[0] == h and rgb_HWC.shape[1] == w:
        return rgb_HWC
    return np.asarray(Image.fromarray(rgb_HWC).resize((w, h), Image.BICUBIC))


def _decode_pyav(data: bytes, plan: SamplingPlan, cfg: VideoConfig, deadline: _Deadline) -> np.ndarray:
    import av

    wanted: dict[int, int] = {}
    for i in plan.indices:
        wanted[i] = wanted.get(i, 0) + 1  # short videos repeat an index
    out: list[np.ndarray] = []
    last = plan.indices[-1]
    try:
        with av.open(_DeadlineReader(data, deadline), mode="r", metadata_errors="ignore") as c:
            s = c.streams.video[0]
            s.thread_type = "AUTO"
            s.thread_count = cfg.decode_threads
            i = -1
            for frame in c.decode(s):
                deadline.check()
                i += 1
                k = wanted.get(i, 0)
                if k:
                    img = _resize(frame.to_ndarray(format="rgb24"), plan.height, plan.width)
                    out.extend([img] * k)
                if i >= last:
                    break
    except VideoDecodeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise VideoDecodeError(f"decode failed at frame {len(out)}: {type(e).__name__}: {e}", "decode_failed") from None
    if len(out) < len(plan.indices):
        raise VideoDecodeError(
            f"over-reporting video: stream decoded to {i + 1} frames, sampling needs frame {last}", "over_reporting"
        )
    return np.stack(out)


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _decode_ffmpeg(data: bytes, plan: SamplingPlan, cfg: VideoConfig, deadline: _Deadline) -> np.ndarray:
    """The ffmpeg binary decodes and selects the frames (select filter on the frame number), we resize with
    the same PIL bicubic as the PyAV path so both backends give the same frames up to decoder differences."""
    sel = "+".join(f"eq(n\\,{i})" for i in sorted(set(plan.indices)))
    tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.NamedTemporaryFile(suffix=".video", dir=tmpdir) as f:
        # A file, not stdin: MP4s with the index at the end need a seekable input.
        f.write(data)
        f.flush()
        cmd = [_ffmpeg_exe(), "-nostdin", "-v", "error", "-threads", str(cfg.decode_threads), "-i", f.name,
               "-map", "0:v:0", "-vf", f"select='{sel}'", "-fps_mode", "passthrough",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]  # fmt: skip
        remaining = max(0.01, deadline.t_end - time.monotonic())
        try:
            # subprocess.run kills the child when the timeout passes: a real bound on a stuck decoder.
            r = subprocess.run(cmd, capture_output=True, timeout=remaining, check=False)
        except subprocess.TimeoutExpired:
            raise VideoDecodeError(f"ffmpeg decode exceeded {deadline.seconds:.1f}s", "timeout") from None
    if r.returncode != 0:
        raise VideoDecodeError(f"ffmpeg failed: {r.stderr.decode(errors='replace')[-300:].strip()}", "decode_failed")
    raw = r.stdout
    # Native size: the header's, which _probe read; the frames come out at that size.
    H, W = plan.native_hw
    per = H * W * 3
    n_unique = len(set(plan.indices))
    if len(raw) < per * n_unique:
        raise VideoDecodeError(
            f"over-reporting video: ffmpeg produced {len(raw) // per} of {n_unique} sampled frames", "over_reporting"
        )
    frames = np.frombuffer(raw[: per * n_unique], np.uint8).reshape(n_unique, H, W, 3)
    by_index = {i: _resize(frames[j], plan.height, plan.width) for j, i in enumerate(sorted(set(plan.indices)))}
    return np.stack([by_index[i] for i in plan.indices])


def backend_version(backend: str) -> str:
    """Version string of the decoder (part of the cache key: a new FFmpeg may decode differently)."""
    if backend == "pyav":
        import av

        return f"pyav-{av.__version__}-libavcodec-{'.'.join(map(str, av.library_versions['libavcodec']))}"
    import imageio_ffmpeg

    return f"ffmpeg-{imageio_ffmpeg.get_ffmpeg_version()}"


def _watched(fn, cfg: VideoConfig):
    """fn(deadline) in a daemon thread under the wall-clock watchdog; its result, or its exception re-raised.

    NOTE: the watchdog. The caller waits at most decode_timeout_s (+ a small grace for the thread to notice) and
    then raises, whatever the decoder is doing. The thread itself stops at its next deadline check (every packet,
    frame and read); the ffmpeg backend's subprocess is killed at the deadline.
    """
    deadline = _Deadline(cfg.decode_timeout_s)
    result: list = []

    def work() -> None:
        try:
            result.append(fn(deadline))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
            result.append(e)

    t = threading.Thread(target=work, name="video-decode", daemon=True)
    t.start()
    t.join(cfg.decode_timeout_s + 0.5)
    if t.is_alive() or not result:
        deadline.aborted.set()
        raise VideoDecodeError(f"video decode exceeded {cfg.decode_timeout_s:.1f}s (watchdog)", "timeout")
    r = result[0]
    if isinstance(r, BaseException):
        raise r
    return r


def probe_plan(data: bytes, cfg: VideoConfig, vision: VisionProcessing | None = None) -> SamplingPlan:
    """The sampling plan (frames, resized size, so the patch grid) from the container alone: demuxed, not decoded.

    The same plan decode_frames follows, so `probe_plan(...).grid_thw` is the grid the decoded clip will have: the
    loader uses it to skip a video that cannot fit its budgets without decoding it. Raises VideoDecodeError."""
    if not data:
        raise VideoDecodeError("zero-length video", "empty")

    def work(deadline: _Deadline) -> SamplingPlan:
        pr = _probe(data, deadline, cfg)
        return plan_sampling(pr.frames, pr.fps, pr.height, pr.width, cfg, vision)

    return _watched(work, cfg)


def decode_frames(data: bytes, cfg: VideoConfig, vision: VisionProcessing | None = None) -> SampledFrames:
    """Decode, sample and resize (at the family's factor): uint8 frames (F, H, W, 3). Runs under the wall-clock
    watchdog."""
    if not data:
        raise VideoDecodeError("zero-length video", "empty")

    def work(deadline: _Deadline) -> SampledFrames:
        pr = _probe(data, deadline, cfg)
        plan = plan_sampling(pr.frames, pr.fps, pr.height, pr.width, cfg, vision)
        fn = _decode_pyav if cfg.backend == "pyav" else _decode_ffmpeg
        frames = fn(data, plan, cfg, deadline)
        meta = {
            "total_frames": pr.frames,
            "reported_frames": pr.reported,
            "video_fps": pr.fps,
            "native_hw": [pr.height, pr.width],
            "capped": plan.capped,
        }
        return SampledFrames(frames, plan.indices, plan.fps_used, meta)

    return _watched(work, cfg)


def frames_to_rows(frames_FHWC: np.ndarray,
                   vision: VisionProcessing | None = None) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 frames -> the processor's float32 pixel rows (N, P) and grid; the same values as data.media.vision's
    patchify(normalize(frames)) (equal to within 1e-6). The loader ships the raw rows instead
    (data.media.vision.video_rows_raw); this is for callers that want the processor's floats."""
    v = vision_or_default(vision)
    rows_u8, grid = video_rows_raw(frames_FHWC, v)
    return normalize_pixel_rows(rows_u8, v), grid


def frames_to_clip(sf: SampledFrames, vision: VisionProcessing | None = None) -> VideoClip:
    """Patchify sampled uint8 frames into raw (uint8) rows in transformers' order; a cache hit pays only this
    rearrangement of bytes (normalization happens on the device)."""
    rows_u8, grid = video_rows_raw(sf.frames_FHWC, vision)
    return VideoClip(rows_u8, grid, float(sf.fps_used), list(sf.frame_indices),
                     float(sf.meta.get("video_fps", 0.0)), vision)
