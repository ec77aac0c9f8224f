"""Video sampling, decoding and pixel rows against Qwen's formula and transformers' processor, on real H.264
clips encoded here; broken files of every kind are counted skips, never hangs."""

from __future__ import annotations

import io
import math
import threading
import time
import wave

import av
import numpy as np
import pytest
import torch
from video_clips import encode_clip, qwen_fetch_video_plan

from data.media import video as video_mod
from data.media.video import VideoClip, VideoConfig, VideoDecodeError, decode_frames, plan_sampling
from data.media.video_cache import load_video


def _tokens(nframes, h, w, factor=28):
    return math.ceil(nframes / 2) * (h // factor) * (w // factor)


@pytest.mark.parametrize(
    "total,fps,H,W",
    [
        (90, 30, 360, 640),  # 3 s
        (301, 29.97, 720, 1280),  # 10 s, NTSC rate
        (1800, 30, 1080, 1920),  # 60 s 1080p
        (3, 30, 240, 320),  # fewer frames than min_frames
        (7, 2, 100, 3000),  # wide, min_frames binds
        (20000, 25, 480, 854),  # 800 s: max_frames binds (and the token cap)
        (2400, 24, 2160, 3840),  # 100 s 4K
        (5000, 50, 64, 64),  # tiny frames, upscaled to min_pixels
    ],
)
@pytest.mark.parametrize("fps_cfg,min_tok,max_tok", [(2.0, None, None), (1.0, 64, 256)])
def test_plan_matches_qwen_formula_or_caps_tokens(total, fps, H, W, fps_cfg, min_tok, max_tok, vision):
    """Frames and frame size as qwen-vl-utils computes them for the family (image_patch_size 14 or 16: factor 28 or
    32; frame bounds in merged tokens x factor^2, by default 128 .. 768), or fewer frames under the hard cap."""
    f = vision.factor
    min_px, max_px = (None, None) if min_tok is None else (min_tok * f * f, max_tok * f * f)
    cfg = VideoConfig(fps=fps_cfg, min_pixels=min_px, max_pixels=max_px)
    ele = {"fps": fps_cfg, "total_pixels": 16384 * f * f}  # max_tokens=16384 stated as qwen-vl-utils' total_pixels
    if min_px is not None:
        ele |= {"min_pixels": min_px, "max_pixels": max_px}
    idx, (h, w), sample_fps = qwen_fetch_video_plan(ele, total, fps, H, W, image_patch_size=vision.patch_size)
    plan = plan_sampling(total, fps, H, W, cfg, vision)
    assert (plan.height, plan.width) == (h, w) and h % f == 0 and w % f == 0
    assert plan.grid_thw == (math.ceil(plan.nframes / 2), h // vision.patch_size, w // vision.patch_size)
    if _tokens(len(idx), h, w, f) <= cfg.token_cap:
        # Within the cap: exactly Qwen's frames, size and fps.
        assert plan.indices == idx and not plan.capped
        assert plan.fps_used == pytest.approx(sample_fps)
    else:
        # Beyond it Qwen overshoots; we keep the cap hard with fewer, evenly spaced frames and a lower fps.
        assert plan.capped and plan.nframes % 2 == 0 and plan.nframes < len(idx)
        assert _tokens(plan.nframes, h, w, f) <= cfg.token_cap < _tokens(plan.nframes + 2, h, w, f)
        assert plan.indices == torch.linspace(0, total - 1, plan.nframes).round().long().tolist()
        assert plan.fps_used == pytest.approx(plan.nframes / total * fps) and plan.fps_used < sample_fps
    assert _tokens(plan.nframes, plan.height, plan.width, f) <= cfg.token_cap


@pytest.mark.parametrize("w,h,n,fps", [(320, 240, 45, 30), (640, 360, 150, 25), (200, 600, 61, 24)])
def test_real_clips_sample_like_qwen(w, h, n, fps, vision):
    """Decoded clips: frame indices, grid and fps as Qwen computes from the decoded frame count (torchvision's
    reader counts decoded frames) for the family, and the frames are the decoded frames at those indices, resized;
    the clip carries the source fps and what the family's time encoding needs."""
    data = encode_clip(w, h, n, fps)
    decoded = [f.to_ndarray(format="rgb24") for f in av.open(io.BytesIO(data)).decode(video=0)]
    p = vision.patch_size
    ele = {"fps": 2.0, "total_pixels": 16384 * vision.factor**2}
    idx, (rh, rw), sample_fps = qwen_fetch_video_plan(ele, len(decoded), fps, h, w, image_patch_size=p)
    clip = load_video(data, VideoConfig(), vision=vision)
    assert isinstance(clip, VideoClip)
    assert clip.frame_indices == idx
    assert clip.grid_thw == (len(idx) // 2, rh // p, rw // p)
    assert clip.pixel_values.shape == (len(idx) // 2 * (rh // p) * (rw // p), 3 * 2 * p * p)
    assert clip.pixel_values.dtype == torch.float32
    assert clip.fps_used == pytest.approx(sample_fps) and clip.video_fps == pytest.approx(fps)
    assert clip.seconds_per_pair == pytest.approx(2 / sample_fps)
    # Qwen3-VL's per-pair times, as its processor computes them from the sampled indices and the source fps.
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    assert clip.frame_pair_timestamps() == Qwen3VLProcessor._calculate_timestamps(None, list(idx), fps, 2)
    sf = decode_frames(data, VideoConfig(), vision)
    for j, i in enumerate(idx):
        ref = video_mod._resize(decoded[i], rh, rw)
        assert np.array_equal(sf.frames_FHWC[j], ref), f"frame {i}"


def test_pixel_rows_match_transformers_processor(vision):
    """Rows vs transformers' processing of the same frames, for the family. Its video processors need torchvision
    (not installable beside torch 2.13 CPU), so the oracle is Qwen2VLImageProcessorPil (with the family's patch size
    and mean / std) per frame: its row j of frame f holds f's patch j repeated over the temporal axis; a video row
    of frame pair (2k, 2k+1) must hold frame 2k's patch in temporal slot 0 and frame 2k+1's in slot 1, in the same
    spatial order."""
    from transformers import Qwen2VLImageProcessorPil

    p = vision.patch_size
    sf = decode_frames(encode_clip(320, 180, 45, 30), VideoConfig(), vision)
    assert len(sf.frames_FHWC) == 4
    clip = video_mod.frames_to_clip(sf, vision)
    proc = Qwen2VLImageProcessorPil(do_resize=False, patch_size=p, image_mean=list(vision.pixel_mean),
                                    image_std=list(vision.pixel_std))
    per_frame = [
        proc(images=[f], return_tensors="np")["pixel_values"].reshape(-1, 3, 2, p, p) for f in sf.frames_FHWC
    ]
    rows = clip.pixel_values.numpy().reshape(len(sf.frames_FHWC) // 2, -1, 3, 2, p, p)
    for k in range(rows.shape[0]):
        np.testing.assert_allclose(rows[k][:, :, 0], per_frame[2 * k][:, :, 0], rtol=0, atol=2e-6)
        np.testing.assert_allclose(rows[k][:, :, 1], per_frame[2 * k + 1][:, :, 1], rtol=0, atol=2e-6)
    t, gh, gw = clip.grid_thw
    grid = proc(images=[sf.frames_FHWC[0]], return_tensors="np")["image_grid_thw"][0]
    assert (gh, gw) == (grid[1], grid[2]) and t == len(sf.frames_FHWC) // 2


@pytest.mark.parametrize("nframes", [4, 3])
def test_fast_rows_equal_vision_normalize_patchify(nframes):
    """frames_to_rows (uint8 patchify, in-place normalize) == data.media.vision.patchify(normalize(...))."""
    from data.media.vision import normalize, patchify

    sf = decode_frames(encode_clip(320, 180, 45, 30), VideoConfig())
    frames = sf.frames_FHWC[:nframes]
    rows, grid = video_mod.frames_to_rows(frames)
    ref, ref_grid = patchify(normalize(frames))
    assert grid == ref_grid and rows.shape == ref.shape and rows.dtype == torch.float32
    torch.testing.assert_close(rows, ref, rtol=0, atol=1e-6)


def test_single_frame_video_is_padded_by_repeating_it(vision):
    clip = load_video(encode_clip(320, 240, 1, 30), VideoConfig(), vision=vision)
    assert clip.frame_indices == [0] and clip.grid_thw[0] == 1
    p = vision.patch_size
    rows = clip.pixel_values.reshape(-1, 3, 2, p, p)
    assert torch.equal(rows[:, :, 0], rows[:, :, 1])


def test_resize_is_close_to_torchvision_antialias_bicubic():
    """qwen-vl-utils resizes with torchvision (bicubic, antialias=True, then clamp/round to uint8), which is
    torch.nn.functional.interpolate with antialias; we use PIL bicubic (fast, also antialiased). Measured gap on a
    real frame: at most a few levels of 255, well under a level on average."""
    data = encode_clip(1280, 720, 2, 30)
    frame = next(iter(av.open(io.BytesIO(data)).decode(video=0))).to_ndarray(format="rgb24")
    h, w = plan_sampling(2, 30, 720, 1280, VideoConfig()).height, plan_sampling(2, 30, 720, 1280, VideoConfig()).width
    ours = video_mod._resize(frame, h, w).astype(np.int16)
    x = torch.from_numpy(frame.copy()).permute(2, 0, 1)[None].float()
    tv = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    tv = tv.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy().astype(np.int16)
    diff = np.abs(ours - tv)
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


def test_token_cap_lowers_fps_on_a_real_long_clip():
    """A clip whose per-frame minimum would break the budget: fewer frames, tokens within the cap, fps_used
    recorded (max_tokens lowered so the clip stays small)."""
    cfg = VideoConfig(max_tokens=1024)
    data = encode_clip(64, 64, 200, 10)  # 20 s
    clip = load_video(data, cfg)
    assert clip.num_tokens <= 1024
    plan = plan_sampling(200, 10, 64, 64, cfg)
    assert plan.capped and clip.frame_indices == plan.indices
    assert clip.fps_used == pytest.approx(len(plan.indices) / 200 * 10) and clip.fps_used < 2.0


def _wav_bytes() -> bytes:
    b = io.BytesIO()
    with wave.open(b, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(8000, np.int16).tobytes())
    return b.getvalue()


def _broken_videos() -> dict[str, tuple[bytes, set[str]]]:
    good = encode_clip(320, 240, 60, 30)
    fast = encode_clip(320, 240, 60, 30, faststart=True)
    rng = np.random.default_rng(0)
    corrupt_header = bytearray(fast)
    moov = fast.find(b"moov")
    corrupt_header[moov - 4 : moov + 400] = rng.integers(0, 256, 404, dtype=np.uint8).tobytes()
    return {
        "zero_length": (b"", {"empty"}),
        "random_bytes": (rng.integers(0, 256, 20000, dtype=np.uint8).tobytes(), {"open_failed"}),
        "corrupt_header": (bytes(corrupt_header), {"open_failed", "decode_failed", "over_reporting"}),
        # index at the end (the default mp4 layout): cut in half, the index is gone
        "truncated_index_at_end": (good[: len(good) // 2], {"open_failed"}),
        # index at the front: it promises 60 frames, the cut data holds fewer -> over-reporting
        "truncated_over_reporting": (fast[: int(len(fast) * 0.8)], {"over_reporting"}),
        "audio_only": (_wav_bytes(), {"no_video_stream"}),
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["pyav", "ffmpeg"])
@pytest.mark.parametrize("name", list(_broken_videos()))
def test_broken_videos_are_counted_skips(name, backend):
    data, reasons = _broken_videos()[name]
    with pytest.raises(VideoDecodeError) as ei:
        load_video(data, VideoConfig(backend=backend, decode_timeout_s=10))
    # Classified by what is wrong with it, not cut off by the 10 s deadline (no "timeout" among the reasons).
    assert ei.value.reason in reasons and ei.value.reason != "timeout", (ei.value.reason, str(ei.value))
    assert isinstance(ei.value, ValueError)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["pyav", "ffmpeg"])
def test_decode_timeout(backend, monkeypatch):
    """The decoder stops itself at its deadline (PyAV: its checks between packets, frames and reads; ffmpeg: the
    subprocess is killed): its own timeout error, whether or not the watchdog released the caller first."""
    outcome: list[BaseException | object] = []
    watched = video_mod._watched

    def spy(fn, cfg):
        def work(deadline):
            try:
                outcome.append(fn(deadline))
            except BaseException as e:
                outcome.append(e)
                raise
            return outcome[-1]

        return watched(work, cfg)

    monkeypatch.setattr(video_mod, "_watched", spy)
    data = encode_clip(640, 360, 150, 30)
    with pytest.raises(VideoDecodeError) as ei:
        load_video(data, VideoConfig(backend=backend, decode_timeout_s=0.02))
    assert ei.value.reason == "timeout"
    # The decode thread ends at its next deadline check; 30 s only turns a decoder that never stops into a failure
    # (decoding this whole clip takes well under that).
    deadline = time.monotonic() + 30
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.01)
    (own,) = outcome
    assert isinstance(own, VideoDecodeError) and own.reason == "timeout" and "watchdog" not in str(own), own


@pytest.mark.timeout(60)
def test_watchdog_bounds_a_decoder_that_ignores_the_deadline(monkeypatch):
    """A decoder stuck in native code never checks the deadline; the caller is still released, while it is stuck."""
    release, returned = threading.Event(), threading.Event()

    def stuck(data, plan, cfg, deadline):
        release.wait(30)  # stands for a native call that never returns control (until the test lets it)
        returned.set()
        raise AssertionError("unreachable in this test")

    monkeypatch.setattr(video_mod, "_decode_pyav", stuck)
    try:
        with pytest.raises(VideoDecodeError, match="watchdog") as ei:
            load_video(encode_clip(320, 240, 30, 30), VideoConfig(decode_timeout_s=0.3))
        assert ei.value.reason == "timeout" and not returned.is_set()  # released before the decoder returned
    finally:
        release.set()


def test_backends_decode_the_same_frames():
    data = encode_clip(640, 360, 90, 30)
    a = decode_frames(data, VideoConfig(backend="pyav"))
    b = decode_frames(data, VideoConfig(backend="ffmpeg"))
    assert a.frame_indices == b.frame_indices
    assert np.array_equal(a.frames_FHWC, b.frames_FHWC)


def test_config_is_strict():
    with pytest.raises(ValueError, match="backend"):
        VideoConfig(backend="decord")
    with pytest.raises(ValueError, match="max_tokens"):
        VideoConfig(max_tokens=10)
    with pytest.raises(TypeError):
        VideoConfig(fpss=2.0)  # type: ignore[call-arg]
