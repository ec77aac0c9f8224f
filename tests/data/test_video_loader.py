"""Videos through the loader end to end: a real H.264 clip (encoded now with PyAV) becomes video pad tokens,
pixel_values_videos rows and a video_grid_thw row, packed with images and text; broken videos are counted skips."""

from __future__ import annotations

import torch
from datahelpers import encode_video, hf_processor, js, small_image, write_dataset

from data.config import DataConfig, DatasetSpec
from data.loader import build_loader
from data.media.video import VideoConfig
from data.media.video_cache import load_video
from model.config import tiny
from model.loss import model_loss
from model.position_ids import packed_mrope_position_ids
from model.qwen2_vl import Qwen2VL


def test_video_samples_end_to_end(tok_dir, tmp_path):
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
    vcfg = VideoConfig(min_pixels=16 * 28 * 28, max_pixels=32 * 28 * 28, max_tokens=256, decode_timeout_s=30)
    cfg = DataConfig(datasets=[DatasetSpec(root)], tokenizer=tok_dir, max_tokens=2048, num_workers=0, epochs=1,
                     max_pixels=64 * 28 * 28, video=vcfg)
    loader = build_loader(cfg, 0, 1)
    batches = list(loader)
    m = loader.metrics()
    assert m["videos"] == 2 and m["images"] == 1
    assert m["skipped"] == 2 and all(k.startswith("skipped/video_") for k in m if k.startswith("skipped/"))

    ref_clip = load_video(clip, vcfg)
    t, h, w = ref_clip.grid_thw
    assert t == 3  # 6 frames / temporal patch 2
    proc = hf_processor(cfg.min_pixels, cfg.max_pixels)
    tok = proc.tokenizer
    for b in batches:
        b.validate()
        assert torch.equal(b.position_ids,
                           packed_mrope_position_ids(b.input_ids, b.cu_seqlens, b.image_grid_thw, b.video_grid_thw))
        assert b.video_grid_thw.tolist() == [[t, h, w]] * b.video_grid_thw.shape[0]
        for k in range(b.video_grid_thw.shape[0]):
            rows = b.pixel_values_videos[k * t * h * w : (k + 1) * t * h * w]
            assert torch.equal(rows, ref_clip.rows_u8)  # raw rows; the model normalizes them
        cu = b.cu_seqlens.tolist()
        for key, s, e in zip(b.sample_keys, cu[:-1], cu[1:]):
            msgs = video_msg if key.endswith("/video") else both_msg
            text = proc.apply_chat_template(msgs, tokenize=False)
            text = text.replace("<|video_pad|>", "<|video_pad|>" * (t * h * w // 4))
            if "<|image_pad|>" in text:
                g = b.image_grid_thw[0]
                text = text.replace("<|image_pad|>", "<|image_pad|>" * int(g.prod() // 4))
            assert b.input_ids[s:e].tolist() == tok(text)["input_ids"]
    # The model consumes the video microbatch.
    torch.manual_seed(0)
    with torch.no_grad():
        loss_sum, n = model_loss(Qwen2VL(tiny()).eval(), batches[0].labels, **batches[0].model_inputs())
    assert torch.isfinite(loss_sum) and int(n) == batches[0].num_supervised
