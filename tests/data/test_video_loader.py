"""Videos through the loader end to end, for each family: a real H.264 clip (encoded now with PyAV) becomes video pad
tokens (Qwen3-VL: per frame pair a timestamp and a block), pixel_values_videos rows and a video_grid_thw row, packed
with images and text; broken videos are counted skips."""

from __future__ import annotations

import torch
from datahelpers import encode_video, hf_processor, hf_video_chat, js, small_image, video_reference, write_dataset

from data.config import DataConfig, DatasetSpec
from data.loader import build_loader
from data.media.video import VideoConfig
from data.media.video_cache import load_video
from model.family import get_preset
from model.loss import model_loss
from model.vlm import VLModel


def test_video_samples_end_to_end(tok_dir, tmp_path, family, vision):
    clip = encode_video(112, 84, 24, fps=8)  # 3 s at 8 fps -> 6 frames at 2 fps
    video_msg = [{"role": "user", "content": [{"type": "video", "video": "vid0.mp4"},
                                              {"type": "text", "text": "What happens?"}]},
                 {"role": "assistant", "content": "The astronaut slides to the right."}]
    both_msg = [{"role": "user", "content": [{"type": "image", "image": "img0.png"},
                                             {"type": "video", "video": "vid0.mp4"},
                                             {"type": "text", "text": "Same person?"}]},
                {"role": "assistant", "content": "Yes."}]
    samples = [
        ("video", {"json": js({"messages": video_msg}), "vid0.mp4": clip}),
        ("both", {"json": js({"messages": both_msg}), "img0.png": small_image(0, 56, 84), "vid0.mp4": clip}),
        ("broken", {"json": js({"messages": video_msg}), "vid0.mp4": clip[: len(clip) // 3]}),
        ("garbage", {"json": js({"messages": video_msg}), "vid0.mp4": b"\x00\x00\x00\x18ftypmp42" + b"x" * 500}),
    ]
    root = write_dataset(tmp_path / "vid", samples)
    f2 = vision.factor ** 2
    vcfg = VideoConfig(min_pixels=8 * f2, max_pixels=32 * f2, max_tokens=256, decode_timeout_s=30)
    cfg = DataConfig(datasets=[DatasetSpec(root)], tokenizer=tok_dir, max_tokens=2048, num_workers=0, epochs=1,
                     max_pixels=64 * f2, video=vcfg)
    loader = build_loader(cfg, 0, 1, vision=vision)
    batches = list(loader)
    m = loader.metrics()
    assert m["videos"] == 2 and m["images"] == 1
    assert m["skipped"] == 2 and all(k.startswith("skipped/video_") for k in m if k.startswith("skipped/"))

    ref_clip = load_video(clip, vcfg, vision=vision)
    t, h, w = ref_clip.grid_thw
    assert t == 3  # 6 frames / temporal patch 2
    ref_video = video_reference(family, clip, 256, vcfg.min_pixels, vcfg.max_pixels)
    assert ref_video["grid"] == (t, h, w)
    proc = hf_processor(*cfg.image_pixels(vision), family)
    for b in batches:
        b.validate()
        n_vid = b.video_grid_thw.shape[0]
        seconds = [ref_clip.seconds_per_pair] * n_vid
        assert torch.equal(b.position_ids, vision.packed_position_ids(b.input_ids, b.cu_seqlens, b.image_grid_thw,
                                                                      b.video_grid_thw, seconds))
        assert b.video_grid_thw.tolist() == [[t, h, w]] * n_vid
        for k in range(n_vid):
            rows = b.pixel_values_videos[k * t * h * w : (k + 1) * t * h * w]
            assert torch.equal(rows, ref_clip.rows_u8)  # raw rows; the model normalizes them
        cu = b.cu_seqlens.tolist()
        for key, s, e in zip(b.sample_keys, cu[:-1], cu[1:]):
            msgs, media = (video_msg, {}) if key.endswith("/video") else (both_msg, samples[1][1])
            ref = hf_video_chat(proc, family, msgs, media, ref_video)
            assert b.input_ids[s:e].tolist() == ref["input_ids"].tolist()
    # The model of the family consumes the video microbatch.
    torch.manual_seed(0)
    with torch.no_grad():
        loss_sum, n = model_loss(VLModel(get_preset(family, "tiny")).eval(), batches[0].labels,
                                 **batches[0].model_inputs())
    assert torch.isfinite(loss_sum) and int(n) == batches[0].num_supervised
